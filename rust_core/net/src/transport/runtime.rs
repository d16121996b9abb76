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

/// The shared runtime, started on first use: one I/O worker per core, at least 2 and at most 8.
pub fn handle() -> &'static Handle {
    RUNTIME
        .get_or_init(|| {
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(cores.clamp(2, 8))
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
