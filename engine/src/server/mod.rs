//! Starting a server: bind one listening socket per core (SO_REUSEPORT, so the kernel
//! spreads connections), start one pinned glommio executor per core, join them in the
//! ring mesh, and run each core's shard.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};
use socket2::{Domain, Protocol, Socket as RawSocket, Type};

mod inbox_io;
mod ring;

use crate::cluster;
use crate::shard::api::endpoint::Endpoint;
use crate::shard::api::router::{Router, SocketHandler};
use crate::shard::app::App;
pub use crate::shard::app::{
    CompressionConfig, Config, InboundContext, PresenceFetch, TlsSource, DEFAULT_MAX_HTTP_CONNECTIONS,
};
use crate::shard::inbox;
use crate::shard::mesh::{Mesh, MeshMsg};
use crate::shard::stats::CoreStats;
use crate::shard::Shard;
use crate::transport;
pub use crate::transport::tls::Tls;

/// The CPUs this process may run on (its affinity mask, e.g. from `taskset`), so that
/// several single-core nodes on one box pin to different CPUs.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this process.
    let cpus = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|c| libc::CPU_ISSET(*c, &set))
            .collect::<Vec<_>>()
    };
    if cpus.is_empty() {
        vec![0]
    } else {
        cpus
    }
}

/// A bound, not yet running server.
///
/// ```no_run
/// # use ringcast::{Config, Router, Server};
/// # struct UserSocket;
/// # impl ringcast::SocketHandler for UserSocket {
/// #     type Assigns = (); async fn connect(&self, _: &ringcast::ConnectInfo) -> Option<()> { Some(()) }
/// # }
/// let server = Server::bind(Config::default(), UserSocket, Router::new()).unwrap();
/// let endpoint = server.endpoint();
/// let running = server.start().unwrap();
/// endpoint.broadcast("rooms:lobby", "new_msg", serde_json::json!({"body": "hi"}));
/// running.join();
/// ```
pub struct Server {
    app: Arc<App>,
    endpoint: Endpoint,
    inboxes: Vec<inbox_io::Inbox>,
    listeners: Vec<RawSocket>,
    local_addr: SocketAddr,
    tls: Option<Arc<Tls>>,
}

fn bind_listener(addr: SocketAddr) -> std::io::Result<RawSocket> {
    let socket = RawSocket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket)
}

impl Server {
    /// Binds `config.listen` once per core. Port 0 picks a free port for all cores.
    pub fn bind<H: SocketHandler>(config: Config, socket: H, router: Router) -> std::io::Result<Server> {
        let cores = config.cores.clamp(1, 64);
        if config.listen.port() != 0 {
            // SO_REUSEPORT would let a second server share a port that is taken, and the
            // kernel would split connections between the two: refuse instead.
            drop(std::net::TcpListener::bind(config.listen)?);
        }
        let first = bind_listener(config.listen)?;
        let local_addr = first.local_addr()?.as_socket().expect("an IP socket");
        let mut listeners = vec![first];
        for _ in 1..cores {
            listeners.push(bind_listener(local_addr)?);
        }
        let stats: Vec<Arc<CoreStats>> = (0..cores).map(|_| Arc::default()).collect();
        let mut inboxes = Vec::new();
        let mut core_inboxes = Vec::new();
        for core_stats in &stats {
            let (tx, rx) = inbox_io::inbox(inbox::INBOX_BOUND, core_stats.clone())?;
            core_inboxes.push(tx);
            inboxes.push(rx);
        }
        let (cluster, link) = match &config.cluster {
            Some(c) => {
                let (handle, link) = cluster::handle(c).map_err(std::io::Error::other)?;
                (Some(handle), Some(link))
            }
            None => (None, None),
        };
        // A certificate that cannot be loaded stops the start, naming the file.
        let tls = config.tls.clone().map(Tls::new).transpose()?.map(Arc::new);
        if let Some(link) = link {
            link.spawn(core_inboxes.clone());
        }
        let config = Config { cores, ..config };
        let endpoint =
            Endpoint::new(core_inboxes, cluster).with_subscription_bound(config.subscription_bound);
        Ok(Server {
            app: Arc::new(App {
                config,
                router,
                socket: Box::new(socket),
                presence_fetch: None,
                stats,
                epoch_seed: crate::clock::unix_nanos(),
            }),
            endpoint,
            inboxes,
            listeners,
            local_addr,
            tls,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that broadcasts into this server from anywhere.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint.clone()
    }

    /// Sets the presence fetch hook, which enriches every `presence_state` and
    /// `presence_diff` before it is sent.
    pub fn presence_fetch(
        mut self,
        fetch: impl Fn(&str, &mut serde_json::Value) + Send + Sync + 'static,
    ) -> Self {
        Arc::get_mut(&mut self.app)
            .expect("not started yet")
            .presence_fetch = Some(Box::new(fetch));
        self
    }

    /// Starts one pinned executor per core; returns once every core accepts.
    pub fn start(self) -> std::io::Result<RunningServer> {
        let cores = self.app.config.cores;
        let cpus = allowed_cpus();
        let mesh = MeshBuilder::<MeshMsg, _>::full(cores, 4096);
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut handles = Vec::new();
        for (i, (listener, inbox)) in self.listeners.into_iter().zip(self.inboxes).enumerate() {
            let app = self.app.clone();
            let endpoint = self.endpoint.clone();
            let mesh = mesh.clone();
            let ready = ready_tx.clone();
            let tls = self.tls.clone();
            let listener_fd = listener.into_raw_fd();
            // A deep ring: io_uring looks up a cancelled poll in a hash table sized by the
            // ring, and every idle connection holds one poll.
            let handle = LocalExecutorBuilder::new(Placement::Fixed(cpus[i % cpus.len()]))
                .ring_depth(4096)
                // glommio pins 10 MiB of registered I/O buffers per executor by default,
                // for DMA file I/O ringcast does not do; sockets read into ringcast's own
                // buffers. A node of a many-node box pays this once per core.
                .io_memory(IO_MEMORY)
                .name(&format!("ringcast-{i}"))
                .spawn(move || async move {
                    let (mesh, receivers) = if cores > 1 {
                        let (senders, receivers) = mesh.join().await.expect("core mesh");
                        let stats = app.stats[senders.peer_id() % app.stats.len()].clone();
                        let (index, peers) = (senders.peer_id(), senders.nr_consumers());
                        let link = ring::RingLink::new(senders, stats, ring::MESH_BACKLOG_BOUND);
                        (Some(Mesh::new(index, peers, Box::new(link))), Some(receivers))
                    } else {
                        (None, None)
                    };
                    let index = mesh.as_ref().map_or(0, Mesh::index);
                    let shard = Shard::new(index, app, endpoint, mesh, crate::clock::Clock::system());
                    let _entered = shard.enter();
                    glommio::spawn_local(transport::flusher::run(shard.clone())).detach();
                    glommio::spawn_local(transport::timers::run(shard.clone())).detach();
                    if let Some(mut receivers) = receivers {
                        for (_, rx) in receivers.streams() {
                            let shard = shard.clone();
                            glommio::spawn_local(async move {
                                while let Some(msg) = rx.recv().await {
                                    if let Some(msg) = shard.handle_mesh(msg) {
                                        transport::longpoll::on_mesh(&shard, msg);
                                    }
                                }
                            })
                            .detach();
                        }
                    }
                    glommio::spawn_local(inbox.run(shard.clone())).detach();
                    crate::transport::park::install(shard.clone());
                    glommio::spawn_local(run_sweeper(shard.clone())).detach();
                    // SAFETY: the fd is a listening TCP socket whose ownership was released
                    // by `into_raw_fd` above and is taken over here exactly once.
                    let listener = unsafe { glommio::net::TcpListener::from_raw_fd(listener_fd) };
                    let _ = ready.send(());
                    transport::run_core(shard, listener, listener_fd, tls).await;
                })
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            handles.push(handle);
        }
        drop(ready_tx);
        for _ in 0..cores {
            ready_rx
                .recv()
                .map_err(|_| std::io::Error::other("a core failed to start"))?;
        }
        Ok(RunningServer {
            handles,
            local_addr: self.local_addr,
            endpoint: self.endpoint,
            tls: self.tls,
            stats: self.app.stats.clone(),
        })
    }
}

/// Registered I/O memory per executor (glommio's default is 10 MiB).
const IO_MEMORY: usize = 1 << 20;

async fn run_sweeper(shard: std::rc::Rc<Shard>) {
    // A quarter of the timeout keeps the overshoot small without scanning too often;
    // at most half a second, so idle connections park soon after PARK_AFTER.
    let period =
        (shard.app.config.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_millis(500));
    let mut last_top = std::time::Instant::now();
    loop {
        glommio::timer::sleep(period).await;
        if last_top.elapsed() >= Duration::from_secs(1) {
            shard.refresh_top_topics(crate::shard::stats::TOP_TOPICS);
            last_top = std::time::Instant::now();
        }
        shard.sweep_idle(shard.now_ms(), transport::park::available());
        transport::longpoll::sweep(&shard, std::time::Instant::now());
        crate::transport::park::poll_now(&shard);
    }
}

/// Starts a graceful shutdown: every core stops accepting, closes its connections
/// with 1001 in batches and stops once they are gone (at most `Config::drain_timeout`).
#[derive(Clone)]
pub struct ShutdownHandle {
    endpoint: Endpoint,
}

impl ShutdownHandle {
    /// Asks every core to shut down; `/healthz` answers 503 from this call on.
    pub fn shutdown(&self) {
        self.endpoint.drain();
    }
}

/// A running server.
pub struct RunningServer {
    handles: Vec<glommio::ExecutorJoinHandle<()>>,
    local_addr: SocketAddr,
    endpoint: Endpoint,
    tls: Option<Arc<Tls>>,
    stats: Vec<Arc<CoreStats>>,
}

impl RunningServer {
    /// Every core's counters (what `/metrics` shows), to read from any thread.
    pub fn stats(&self) -> Vec<Arc<CoreStats>> {
        self.stats.clone()
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that broadcasts into this server from anywhere.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint.clone()
    }

    /// The server's TLS, to reload its certificate from any thread (SIGHUP); `None`
    /// when it serves plain TCP.
    pub fn tls(&self) -> Option<Arc<Tls>> {
        self.tls.clone()
    }

    /// A handle that starts a graceful shutdown from any thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            endpoint: self.endpoint.clone(),
        }
    }

    /// Blocks until every core has stopped.
    ///
    /// A core whose thread died (a panic outside any handler, which ringcast isolates)
    /// leaves its connections unserved and the other cores waiting on it: the process
    /// then ends at once with status 70 and a log line naming the core, so that a
    /// supervisor restarts it, rather than limping on.
    pub fn join(self) {
        let (done_tx, done) = mpsc::channel();
        let cores = self.handles.len();
        for (core, handle) in self.handles.into_iter().enumerate() {
            let done_tx = done_tx.clone();
            std::thread::spawn(move || {
                let _ = done_tx.send((core, handle.join()));
            });
        }
        drop(done_tx);
        for _ in 0..cores {
            match done.recv() {
                Ok((_, Ok(()))) => {}
                Ok((core, Err(e))) => {
                    tracing::error!(core, "core {core} died ({e}): ending the process");
                    eprintln!(
                        "ringcast: core {core} died ({e}); exiting so that a supervisor restarts the server"
                    );
                    std::process::exit(70);
                }
                Err(_) => return,
            }
        }
    }
}
