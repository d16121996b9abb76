//! The one tokio runtime of the process, shared by servers, clients and the link emulator.
//!
//! Blocking callers (Python threads, server handlers) never `block_on` it: they spawn the work on it and wait on
//! a std channel. That is what lets a server's handler, running on a blocking thread, use a `Client` to forward
//! to the next tier without a "runtime within runtime" panic or a deadlock.

use std::future::Future;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// Environment variable that sets the number of I/O workers (1..=64) instead of [`io_threads`]' default.
pub const IO_THREADS_ENV: &str = "AIFLOW_IO_THREADS";

/// I/O workers of the shared runtime: `AIFLOW_IO_THREADS` if set to 1..=64, else one per core, 2 to 8.
///
/// A trade-off measured both ways (docs/transport.md, Threads): with one worker a round trip between client and
/// server in one process wakes fewer threads (tokio wakes idle workers to steal the busy one's work), so
/// `aiflow bench transport`'s 4 KiB echo takes fewer context switches, less CPU time and less time; between tier
/// processes on a loaded machine, one worker per process made decode steps slower, so the default keeps more.
pub fn io_threads() -> usize {
    let set = std::env::var(IO_THREADS_ENV).ok().and_then(|v| v.trim().parse::<usize>().ok()).filter(|n| (1..=64).contains(n));
    set.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 8))
}

/// The shared runtime, started on first use, with [`io_threads`] I/O workers.
pub fn handle() -> &'static Handle {
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(io_threads())
                .thread_name("aiflow-io")
                .enable_all()
                .build()
                .expect("cannot start the aiflow I/O runtime")
        })
        .handle()
}

/// Work running on the shared runtime whose result a blocking thread can wait for.
pub struct Pending<T> {
    rx: mpsc::Receiver<T>,
    task: JoinHandle<()>,
}

impl<T: Send + 'static> Pending<T> {
    /// Spawns `fut` on the shared runtime.
    pub fn spawn<F: Future<Output = T> + Send + 'static>(fut: F) -> Pending<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        let task = handle().spawn(async move {
            let _ = tx.send(fut.await);
        });
        Pending { rx, task }
    }

    /// Waits up to `d`; `Ok(None)` when not done yet (the caller may check for signals and wait again).
    pub fn wait_for(&self, d: Duration) -> Result<Option<T>> {
        match self.rx.recv_timeout(d) {
            Ok(v) => Ok(Some(v)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::Transport("the I/O task ended without a result".into())),
        }
    }

    /// Waits until done.
    pub fn wait(self) -> Result<T> {
        self.rx.recv().map_err(|_| Error::Transport("the I/O task ended without a result".into()))
    }
}

impl<T> Drop for Pending<T> {
    fn drop(&mut self) {
        // A caller that stops waiting (Ctrl-C, an exception) cancels the work rather than leaving it running.
        self.task.abort();
    }
}

/// Runs `fut` on the shared runtime and blocks the calling (non-runtime) thread until it is done.
pub fn block_on<T: Send + 'static, F: Future<Output = T> + Send + 'static>(fut: F) -> Result<T> {
    Pending::spawn(fut).wait()
}
