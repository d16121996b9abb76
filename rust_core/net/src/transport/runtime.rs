//! The I/O threads of the process, shared by servers, clients and the link emulator.
//!
//! Each I/O thread runs its own single-threaded tokio runtime, and each endpoint (a server's or a client's UDP
//! socket, with all its connections) lives on one of them, chosen round-robin when it is made ([`next_handle`]).
//! A multi-thread runtime was used before: its workers wake each other to steal work (after every I/O wake-up that
//! readies more than one task, and on every spawn), which cost about 3.5 extra context switches per round trip
//! of a 4 KiB echo (docs/transport.md, Threads); an endpoint's work is serialised by quinn anyway (one connection
//! state, one socket), so one thread per endpoint loses no parallelism that mattered, and different endpoints (a
//! tier's server and its client of the next tier) still run on different threads.
//!
//! Blocking callers (Python threads, server handlers) never `block_on` a runtime: they spawn the work on it and
//! wait on a std channel. That is what lets a server's handler, running on a blocking thread, use a `Client` to
//! forward to the next tier without a "runtime within runtime" panic or a deadlock.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

static IO_THREADS: OnceLock<Vec<Handle>> = OnceLock::new();
static NEXT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set on the I/O threads: a blocking wait there would wait on work that only that thread can do.
    static ON_IO_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Refuses a blocking wait on an I/O thread (a handler run inline there that makes a request of its own): it
/// would wait forever on work queued behind itself.
fn check_not_io_thread() -> Result<()> {
    if ON_IO_THREAD.with(|on| on.get()) {
        return Err(Error::Input(
            "a blocking transport call on an I/O thread (a handler run inline, AIFLOW_INLINE_HANDLER_BYTES) would deadlock; \
             such a handler must not make requests"
                .into(),
        ));
    }
    Ok(())
}

/// Environment variable that sets the number of I/O threads (1..=64) instead of [`io_threads`]' default.
pub const IO_THREADS_ENV: &str = "AIFLOW_IO_THREADS";

/// I/O threads of the process: `AIFLOW_IO_THREADS` if set to 1..=64, else one per core, 2 to 8.
///
/// Endpoints are spread over them; with one, every endpoint of the process shares one thread (fewest thread
/// hand-offs between a client and a server in one process, no parallelism between a tier's two endpoints).
pub fn io_threads() -> usize {
    let set = std::env::var(IO_THREADS_ENV).ok().and_then(|v| v.trim().parse::<usize>().ok()).filter(|n| (1..=64).contains(n));
    set.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 8))
}

/// Starts one I/O thread: a single-threaded runtime (I/O, timers, and its own blocking pool for handlers) that
/// its thread drives for the life of the process.
fn start_io_thread(i: usize) -> Handle {
    let rt = tokio::runtime::Builder::new_current_thread()
        .thread_name("aiflow-handler")
        .enable_all()
        .build()
        .expect("cannot start an aiflow I/O runtime");
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name(format!("aiflow-io-{i}"))
        .spawn(move || {
            ON_IO_THREAD.with(|on| on.set(true));
            rt.block_on(std::future::pending::<()>())
        })
        .expect("cannot start an aiflow I/O thread");
    handle
}

fn all() -> &'static [Handle] {
    IO_THREADS.get_or_init(|| (0..io_threads()).map(start_io_thread).collect())
}

/// The first I/O thread's runtime, for work that belongs to no endpoint (waiting, the link emulator).
pub fn handle() -> &'static Handle {
    &all()[0]
}

/// The runtime a new endpoint should live on: the I/O threads in turn.
pub fn next_handle() -> &'static Handle {
    let threads = all();
    &threads[NEXT.fetch_add(1, Ordering::Relaxed) % threads.len()]
}

/// Work running on an I/O thread whose result a blocking thread can wait for.
pub struct Pending<T> {
    rx: mpsc::Receiver<T>,
    task: JoinHandle<()>,
}

impl<T: Send + 'static> Pending<T> {
    /// Spawns `fut` on the first I/O thread.
    pub fn spawn<F: Future<Output = T> + Send + 'static>(fut: F) -> Pending<T> {
        Pending::spawn_on(handle(), fut)
    }

    /// Spawns `fut` on the runtime `rt` (an endpoint's: its connections' drivers are spawned there too).
    pub fn spawn_on<F: Future<Output = T> + Send + 'static>(rt: &Handle, fut: F) -> Pending<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        let task = rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        Pending { rx, task }
    }

    /// Waits up to `d`; `Ok(None)` when not done yet (the caller may check for signals and wait again).
    pub fn wait_for(&self, d: Duration) -> Result<Option<T>> {
        check_not_io_thread()?;
        match self.rx.recv_timeout(d) {
            Ok(v) => Ok(Some(v)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::Transport("the I/O task ended without a result".into())),
        }
    }

    /// Waits until done.
    pub fn wait(self) -> Result<T> {
        check_not_io_thread()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_of(rt: &Handle) -> String {
        Pending::spawn_on(rt, async { std::thread::current().name().unwrap_or("").to_string() }).wait().unwrap()
    }

    #[test]
    fn endpoints_are_spread_over_the_io_threads_and_work_runs_on_its_thread() {
        let n = all().len();
        assert_eq!(n, io_threads());
        // Consecutive endpoints get the threads in turn (other tests may take turns in between: only the set is
        // checked), and a task spawned on a thread's runtime runs on that thread.
        let names: std::collections::BTreeSet<String> = (0..4 * n).map(|_| thread_of(next_handle())).collect();
        let want: std::collections::BTreeSet<String> = (0..n).map(|i| format!("aiflow-io-{i}")).collect();
        assert_eq!(names, want);
        assert_eq!(thread_of(handle()), "aiflow-io-0");
        // Handlers (the runtime's blocking pool) run on other threads, never on the I/O thread.
        let pool = Pending::spawn_on(handle(), async {
            tokio::task::spawn_blocking(|| std::thread::current().name().unwrap_or("").to_string()).await.unwrap()
        });
        assert_eq!(pool.wait().unwrap(), "aiflow-handler");
        // A blocking wait on an I/O thread (an inline handler making a request) is refused, not a deadlock.
        let nested = Pending::spawn_on(handle(), async { Pending::spawn_on(handle(), async { 1 }).wait() });
        let e = nested.wait().unwrap().unwrap_err();
        assert!(e.to_string().contains("would deadlock"), "{e}");
    }
}
