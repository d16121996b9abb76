//! The UDP relay that applies the link model: clients send to `listen`, the relay forwards to `forward` through
//! the uplink pipe and relays replies back through the downlink pipe. NAT-style: each client address gets its
//! own upstream socket, so replies find their way back. All tasks stop when the emulator is closed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use aiflow_proto::link::{Direction, Pipe, Verdict};
use crate::error::{Error, Result};
use crate::transport::runtime;

/// Most client addresses relayed at once; datagrams from further ones are dropped (keeps memory bounded).
pub const MAX_FLOWS: usize = 1024;
/// Most datagrams waiting for their delivery time per direction (beyond the queue: those in propagation).
const MAX_IN_FLIGHT: usize = 1 << 16;

/// A link: both directions and the largest datagram it carries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// Client -> server.
    pub uplink: Direction,
    /// Server -> client.
    pub downlink: Direction,
    /// Largest UDP payload (bytes); 1472 = a 1500-byte Ethernet MTU minus IPv4 and UDP headers.
    pub max_datagram_bytes: usize,
    /// Seed of the loss and jitter draws (reproducible runs).
    pub seed: u64,
}

counters! {
    /// Counters of one direction.
    struct DirCounters;
    /// A snapshot of one direction's counters.
    pub struct DirStats {
        packets_in,
        bytes_in,
        packets_out,
        bytes_out,
        lost,
        queue_drops,
        too_big,
    }
}

impl DirCounters {
    fn count(&self, v: &Verdict) {
        let c = match v {
            Verdict::Deliver(_) => return,
            Verdict::Lost => &self.lost,
            Verdict::QueueFull => &self.queue_drops,
            Verdict::TooBig => &self.too_big,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

struct Shared {
    epoch: Instant,
    up: DirCounters,
    down: DirCounters,
    flows: AtomicU64,
}

impl Shared {
    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }
}

/// A datagram waiting for its delivery time.
struct Scheduled<T> {
    at: f64,
    data: Bytes,
    to: T,
}

/// A running emulator.
pub struct Emulator {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Emulator {
    /// Binds `listen` and starts relaying to `forward`.
    pub fn start(listen: SocketAddr, forward: SocketAddr, params: LinkParams) -> Result<Emulator> {
        params.uplink.validate("uplink")?;
        params.downlink.validate("downlink")?;
        if params.max_datagram_bytes == 0 || params.max_datagram_bytes > 65_507 {
            return Err(Error::Input(format!("max_datagram_bytes {} outside 1..=65507", params.max_datagram_bytes)));
        }
        let h = runtime::handle();
        let sock = {
            let _g = h.enter();
            let std_sock = std::net::UdpSocket::bind(listen).map_err(|e| Error::Transport(format!("netem cannot bind udp {listen}: {e}")))?;
            std_sock.set_nonblocking(true)?;
            Arc::new(UdpSocket::from_std(std_sock)?)
        };
        let local_addr = sock.local_addr()?;
        let shared = Arc::new(Shared { epoch: Instant::now(), up: DirCounters::default(), down: DirCounters::default(), flows: AtomicU64::new(0) });
        let (stop, stop_rx) = watch::channel(false);
        let (up_tx, up_rx) = mpsc::channel::<Scheduled<Arc<UdpSocket>>>(MAX_IN_FLIGHT);
        let (down_tx, down_rx) = mpsc::channel::<Scheduled<SocketAddr>>(MAX_IN_FLIGHT);
        let down_pipe = Arc::new(Mutex::new(Pipe::new(params.downlink, params.max_datagram_bytes, params.seed ^ 0x5eed_d0e5)));
        let up_pipe = Pipe::new(params.uplink, params.max_datagram_bytes, params.seed);
        let ingress = Ingress { sock: sock.clone(), forward, shared: shared.clone(), stop: stop_rx.clone(), down_tx, down_pipe };
        let tasks = vec![
            h.spawn(ingress.run(up_pipe, up_tx)),
            h.spawn(deliver(up_rx, shared.clone(), stop_rx.clone(), |s: &Scheduled<Arc<UdpSocket>>| (s.to.clone(), None), true)),
            h.spawn(deliver(down_rx, shared.clone(), stop_rx, move |s: &Scheduled<SocketAddr>| (sock.clone(), Some(s.to)), false)),
        ];
        Ok(Emulator { local_addr, shared, stop, tasks })
    }

    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// (uplink, downlink) counters.
    pub fn stats(&self) -> (DirStats, DirStats) {
        (self.shared.up.snapshot(), self.shared.down.snapshot())
    }

    /// Number of client addresses relayed so far.
    pub fn flows(&self) -> u64 {
        self.shared.flows.load(Ordering::Relaxed)
    }

    /// Stops every task and closes the sockets; waits up to 1 s for the tasks to end.
    pub fn close(&mut self) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut self.tasks);
        if tasks.is_empty() {
            return;
        }
        let _ = runtime::block_on(async move {
            for t in tasks {
                let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
            }
        });
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Ingress {
    sock: Arc<UdpSocket>,
    forward: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    down_tx: mpsc::Sender<Scheduled<SocketAddr>>,
    down_pipe: Arc<Mutex<Pipe>>,
}

impl Ingress {
    /// Client -> server: admits each datagram to the uplink pipe, creating the client's upstream socket (and
    /// its downlink reader) on its first datagram.
    async fn run(self, mut pipe: Pipe, up_tx: mpsc::Sender<Scheduled<Arc<UdpSocket>>>) {
        let mut flows: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut stop = self.stop.clone();
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, from) = tokio::select! {
                _ = stop.changed() => break,
                r = self.sock.recv_from(&mut buf) => match r {
                    Ok(v) => v,
                    // ICMP errors surface here on some systems; a relay keeps going.
                    Err(_) => continue,
                },
            };
            let c = &self.shared.up;
            c.packets_in.fetch_add(1, Ordering::Relaxed);
            c.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
            let upstream = match flows.get(&from) {
                Some(s) => s.clone(),
                None => {
                    if flows.len() >= MAX_FLOWS {
                        continue;
                    }
                    let Ok(s) = self.open_flow(from).await else { continue };
                    flows.insert(from, s.clone());
                    s
                }
            };
            let v = pipe.offer(self.shared.now(), n);
            c.count(&v);
            if let Verdict::Deliver(at) = v {
                if up_tx.try_send(Scheduled { at, data: Bytes::copy_from_slice(&buf[..n]), to: upstream }).is_err() {
                    c.queue_drops.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    async fn open_flow(&self, client: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
        let bind: SocketAddr = if self.forward.is_ipv6() { "[::]:0".parse().expect("addr") } else { "0.0.0.0:0".parse().expect("addr") };
        let s = UdpSocket::bind(bind).await?;
        s.connect(self.forward).await?;
        let s = Arc::new(s);
        self.shared.flows.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(downlink_reader(s.clone(), client, self.shared.clone(), self.stop.clone(), self.down_tx.clone(), self.down_pipe.clone()));
        Ok(s)
    }
}

/// Server -> client for one flow: admits each reply to the (shared) downlink pipe.
async fn downlink_reader(
    upstream: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    down_tx: mpsc::Sender<Scheduled<SocketAddr>>,
    pipe: Arc<Mutex<Pipe>>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = tokio::select! {
            _ = stop.changed() => break,
            r = upstream.recv(&mut buf) => match r {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        let c = &shared.down;
        c.packets_in.fetch_add(1, Ordering::Relaxed);
        c.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        let v = match pipe.lock() {
            Ok(mut p) => p.offer(shared.now(), n),
            Err(_) => break,
        };
        c.count(&v);
        if let Verdict::Deliver(at) = v {
            if down_tx.try_send(Scheduled { at, data: Bytes::copy_from_slice(&buf[..n]), to: client }).is_err() {
                c.queue_drops.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Sends each scheduled datagram at its time (in order; delivery times are non-decreasing per direction).
async fn deliver<T, F>(mut rx: mpsc::Receiver<Scheduled<T>>, shared: Arc<Shared>, mut stop: watch::Receiver<bool>, route: F, up: bool)
where
    F: Fn(&Scheduled<T>) -> (Arc<UdpSocket>, Option<SocketAddr>),
{
    let c = if up { &shared.up } else { &shared.down };
    loop {
        let s = tokio::select! {
            _ = stop.changed() => break,
            s = rx.recv() => match s { Some(s) => s, None => break },
        };
        let wait = s.at - shared.now();
        if wait > 0.0 {
            let sleep = tokio::time::sleep(Duration::from_secs_f64(wait));
            tokio::select! {
                _ = stop.changed() => break,
                _ = sleep => {}
            }
        }
        let (sock, to) = route(&s);
        let sent = match to {
            Some(addr) => sock.send_to(&s.data, addr).await,
            None => sock.send(&s.data).await,
        };
        if sent.is_ok() {
            c.packets_out.fetch_add(1, Ordering::Relaxed);
            c.bytes_out.fetch_add(s.data.len() as u64, Ordering::Relaxed);
        }
    }
}
