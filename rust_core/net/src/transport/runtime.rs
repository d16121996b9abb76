//! The tokio runtimes of the process: one for servers and the link emulator ([`handle`]), one for clients
//! ([`client_handle`]), each with few I/O workers ([`io_threads`]).
//!
//! Two, so that the two ends of a link in one process (a tier's server and its client of the next tier, or a
//! benchmark's client and server) each have their own worker: the work of a request and of its reply run in
//! parallel on two cores, and neither runtime wakes idle workers to steal the other's work.
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
static CLIENT_RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// Environment variable that sets the number of I/O worker threads (1..=64), overriding [`io_threads`]' default.
pub const IO_THREADS_ENV: &str = "AIFLOW_IO_THREADS";

/// I/O workers of each runtime: `AIFLOW_IO_THREADS` if set to 1..=64, else one per 4 cores, 1 to 4.
///
/// Few on purpose. Every request crosses from the caller's thread to a worker and back, and the server's
/// handler runs on a blocking thread; with more workers than the traffic needs, tokio also wakes idle workers
/// to steal the busy one's work. `aiflow bench transport` prints the context switches and CPU time per round
/// trip (docs/transport.md, Measured: one runtime of 2 workers, the earlier layout, against these two of 1).
/// Machines with many cores and many busy connections get more workers for the connections' crypto.
pub fn io_threads() -> usize {
    let set = std::env::var(IO_THREADS_ENV).ok().and_then(|v| v.trim().parse::<usize>().ok()).filter(|n| (1..=64).contains(n));
    set.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        (cores / 4).clamp(1, 4)
    })
}

fn build(name: &str) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(io_threads())
        .thread_name(name)
        .enable_all()
        .build()
        .expect("cannot start the aiflow I/O runtime")
}

/// The runtime of servers and the link emulator, started on first use.
pub fn handle() -> &'static Handle {
    RUNTIME.get_or_init(|| build("aiflow-io")).handle()
}

/// The runtime of clients, started on first use.
pub fn client_handle() -> &'static Handle {
    CLIENT_RUNTIME.get_or_init(|| build("aiflow-io-client")).handle()
}

/// Work running on the shared runtime whose result a blocking thread can wait for.
pub struct Pending<T> {
    rx: mpsc::Receiver<T>,
    task: JoinHandle<()>,
}

impl<T: Send + 'static> Pending<T> {
    /// Spawns `fut` on the servers' runtime.
    pub fn spawn<F: Future<Output = T> + Send + 'static>(fut: F) -> Pending<T> {
        Pending::spawn_on(handle(), fut)
    }

    /// Spawns `fut` on runtime `h`.
    pub fn spawn_on<F: Future<Output = T> + Send + 'static>(h: &Handle, fut: F) -> Pending<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        let task = h.spawn(async move {
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
