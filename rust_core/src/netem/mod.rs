//! Userspace link emulator (see issue 3). Filled in by the transport work.
