//! End-to-end harness: a real nats-server, the real orchestrator and service binaries as separate
//! processes, and a client that talks to them only through NATS, the way `nats pub`, `nats req`
//! and `nats kv get` would.

#![allow(dead_code)]

use std::{collections::HashMap, path::PathBuf, time::Duration};

use async_nats::{
    jetstream::{self, consumer},
    HeaderMap,
};
use futures::StreamExt;
use jetsaga_common::{
    dev, protocol,
    testkit::{bin, NatsServer, Proc},
    topology,
};
use serde_json::{json, Value};

pub const SERVICES: [&str; 3] = ["order", "payment", "inventory"];

/// Starting balances and stock of the test seed.
pub fn seed() -> Value {
    json!({
        "customers": {"c-1": 1_000_000, "c-2": 500, "c-3": 1_000_000},
        "stock": {"sku-1": 1000, "sku-2": 1000, "sku-3": 1}
    })
}

pub struct System {
    pub nats: NatsServer,
    pub orchestrators: Vec<Proc>,
    pub services: HashMap<&'static str, Proc>,
    pub dir: tempfile::TempDir,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    base_env: Vec<(String, String)>,
    seed_path: PathBuf,
}

/// How to start a [`System`].
pub struct Options {
    pub orchestrators: usize,
    /// A definition to run instead of the built-in order saga.
    pub definition: Option<Value>,
    /// Extra environment per service: (service, key, value).
    pub service_env: Vec<(&'static str, &'static str, String)>,
    /// Extra environment for the orchestrators.
    pub orchestrator_env: Vec<(&'static str, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            orchestrators: 1,
            definition: None,
            service_env: Vec::new(),
            orchestrator_env: Vec::new(),
        }
    }
}

/// The built-in order definition as JSON, to edit for a test.
pub fn order_definition() -> Value {
    serde_json::from_str(jetsaga_orchestrator::definition::BUILTIN_ORDER).unwrap()
}

/// Sends SIGTERM (a graceful stop) to a process.
pub fn terminate(p: &Proc) {
    let pid = p.pid().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM {pid}");
}

impl System {
    /// Starts nats-server, `orchestrators` orchestrator processes and the three services.
    pub async fn start(orchestrators: usize) -> Self {
        Self::start_with(Options {
            orchestrators,
            ..Options::default()
        })
        .await
    }

    /// Starts a system as `opts` says.
    pub async fn start_with(opts: Options) -> Self {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let seed_path = dir.path().join("seed.json");
        std::fs::write(&seed_path, seed().to_string()).unwrap();
        let base_env = vec![
            ("NATS_URL".to_string(), nats.url()),
            ("RUST_LOG".to_string(), "info".to_string()),
        ];
        let mut orch_args = Vec::new();
        if let Some(def) = &opts.definition {
            let path = dir.path().join("definition.json");
            std::fs::write(&path, def.to_string()).unwrap();
            orch_args = vec!["--definition".to_string(), path.display().to_string()];
        }
        let mut orch_env = base_env.clone();
        orch_env.extend(dev::credentials("orchestrator"));
        orch_env.extend(
            opts.orchestrator_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone())),
        );
        let mut orchs = Vec::new();
        for i in 0..opts.orchestrators {
            orchs.push(Proc::spawn(
                &format!("orchestrator-{i}"),
                bin("jetsaga-orchestrator"),
                orch_args.clone(),
                orch_env.clone(),
                dir.path().join(format!("orchestrator-{i}.log")),
            ));
        }
        // The test client is an operator: it may publish requests and operator commands, read
        // the bucket and the streams, query services and watch traffic, as nats.conf allows.
        let client = dev::connect_as(&nats.url(), "admin").await.unwrap();
        let js = jetstream::new(client.clone());
        let mut sys = System {
            nats,
            orchestrators: orchs,
            services: HashMap::new(),
            dir,
            client,
            js,
            base_env,
            seed_path,
        };
        for svc in SERVICES {
            let extra = opts
                .service_env
                .iter()
                .filter(|(s, _, _)| *s == svc)
                .map(|(_, k, v)| (k.to_string(), v.to_string()))
                .collect();
            sys.spawn_service(svc, extra);
        }
        sys.wait_ready().await;
        sys
    }

    /// (Re)starts a service process with extra environment (e.g. fault injection), killing the
    /// running one first. Its SQLite file stays.
    pub fn spawn_service(&mut self, svc: &'static str, extra: Vec<(String, String)>) {
        if let Some(mut old) = self.services.remove(svc) {
            old.kill();
        }
        let mut env = self.base_env.clone();
        env.push((
            "JETSAGA_DB".into(),
            self.dir
                .path()
                .join(format!("{svc}.sqlite"))
                .display()
                .to_string(),
        ));
        env.push(("JETSAGA_SEED".into(), self.seed_path.display().to_string()));
        env.extend(dev::credentials(svc));
        env.extend(extra);
        self.services.insert(
            svc,
            Proc::spawn(
                svc,
                bin(&format!("jetsaga-{svc}")),
                vec![],
                env,
                self.dir.path().join(format!("{svc}.log")),
            ),
        );
    }

    /// Waits until every durable consumer exists and every service answers a query.
    pub async fn wait_ready(&self) {
        let mut wanted: Vec<(&str, String)> = vec![
            (
                topology::REQUESTS_STREAM,
                topology::ORCHESTRATOR_REQUESTS_CONSUMER.to_string(),
            ),
            (
                topology::REPLIES_STREAM,
                topology::ORCHESTRATOR_REPLIES_CONSUMER.to_string(),
            ),
        ];
        for s in SERVICES {
            wanted.push((topology::COMMANDS_STREAM, topology::service_consumer(s)));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for (stream, consumer) in wanted {
            loop {
                let ok = self
                    .js
                    .get_consumer_from_stream::<consumer::pull::Config, _, _>(&consumer, stream)
                    .await
                    .is_ok();
                if ok {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "consumer {consumer} on {stream} never appeared\n{}",
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for (svc, what, req) in [
            ("order", "status", json!({"order_id": "none"})),
            ("payment", "balance", json!({"customer_id": "c-1"})),
            ("inventory", "stock", json!({"sku": "sku-1"})),
        ] {
            loop {
                let subject = protocol::query_subject(svc, what);
                let got = tokio::time::timeout(
                    Duration::from_secs(2),
                    self.client.request(subject, req.to_string().into()),
                )
                .await;
                if matches!(got, Ok(Ok(_))) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{svc} never answered queries\n{}",
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Every process's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for p in self.orchestrators.iter().chain(self.services.values()) {
            let text = p.output();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("---- {} (last 40 lines) ----\n", p.name));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// What `nats pub orders.create '<body>' [-H Nats-Msg-Id:<id>]` does: a plain core publish.
    pub async fn publish(&self, body: &[u8], msg_id: Option<&str>) {
        let mut headers = HeaderMap::new();
        if let Some(id) = msg_id {
            headers.insert("Nats-Msg-Id", id);
        }
        self.client
            .publish_with_headers("orders.create", headers, body.to_vec().into())
            .await
            .unwrap();
        self.client.flush().await.unwrap();
    }

    /// What `nats req orders.create '<body>'` does: the reply is the stream's PubAck.
    pub async fn request(&self, body: &[u8], msg_id: Option<&str>) -> Value {
        let mut headers = HeaderMap::new();
        if let Some(id) = msg_id {
            headers.insert("Nats-Msg-Id", id);
        }
        let reply = self
            .client
            .request_with_headers("orders.create", headers, body.to_vec().into())
            .await
            .unwrap();
        serde_json::from_slice(&reply.payload).unwrap()
    }

    /// `nats kv get sagas <id>`, parsed.
    pub async fn saga(&self, id: &str) -> Option<Value> {
        let kv = self.js.get_key_value(topology::SAGAS_BUCKET).await.unwrap();
        kv.get(id)
            .await
            .unwrap()
            .map(|v| serde_json::from_slice(&v).unwrap())
    }

    /// Waits until the saga is completed, compensated or stuck, and returns its state.
    pub async fn wait_terminal(&self, id: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.saga(id).await {
                if matches!(
                    s["status"].as_str(),
                    Some("completed" | "compensated" | "stuck")
                ) {
                    return s;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "saga {id} did not end within {timeout:?}; state {:?}\n{}",
                self.saga(id).await,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks a service; retries while it has no responder (e.g. still reconnecting after a
    /// server restart), for at most 20 s.
    pub async fn query(&self, svc: &str, what: &str, req: Value) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let subject = protocol::query_subject(svc, what);
            let got = tokio::time::timeout(
                Duration::from_secs(5),
                self.client.request(subject.clone(), req.to_string().into()),
            )
            .await;
            match got {
                Ok(Ok(reply)) => return serde_json::from_slice(&reply.payload).unwrap(),
                other => assert!(
                    tokio::time::Instant::now() < deadline,
                    "{subject} not answered: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn balance(&self, customer: &str) -> i64 {
        let v = self
            .query("payment", "balance", json!({"customer_id": customer}))
            .await;
        v["balance_cents"]
            .as_i64()
            .unwrap_or_else(|| panic!("balance of {customer}: {v}"))
    }

    pub async fn stock(&self, sku: &str) -> i64 {
        let v = self.query("inventory", "stock", json!({"sku": sku})).await;
        v["quantity"]
            .as_i64()
            .unwrap_or_else(|| panic!("stock of {sku}: {v}"))
    }

    pub async fn order_status(&self, id: &str) -> String {
        let v = self.query("order", "status", json!({"order_id": id})).await;
        v["status"].as_str().unwrap_or("?").to_string()
    }

    /// Every dead letter: (reason header, original payload).
    pub async fn dead_letters(&self) -> Vec<(String, Vec<u8>)> {
        let stream = self.js.get_stream(topology::DLQ_STREAM).await.unwrap();
        let n = stream.get_info().await.unwrap().state.messages as usize;
        if n == 0 {
            return Vec::new();
        }
        let c = stream
            .create_consumer(consumer::pull::OrderedConfig::default())
            .await
            .unwrap();
        let mut msgs = c.messages().await.unwrap();
        let mut out = Vec::new();
        while out.len() < n {
            let m = tokio::time::timeout(Duration::from_secs(5), msgs.next())
                .await
                .expect("dead letter in time")
                .unwrap()
                .unwrap();
            let reason = m
                .headers
                .as_ref()
                .and_then(|h| h.get(protocol::DLQ_REASON))
                .map(|v| v.to_string())
                .unwrap_or_default();
            out.push((reason, m.payload.to_vec()));
        }
        out
    }

    pub fn service(&mut self, name: &str) -> &mut Proc {
        self.services.get_mut(name).unwrap()
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

/// An order body.
pub fn order(id: &str, customer: &str, sku: &str, quantity: i64, price: i64) -> Vec<u8> {
    json!({"order_id": id, "customer_id": customer,
           "items": [{"sku": sku, "quantity": quantity, "unit_price_cents": price}]})
    .to_string()
    .into_bytes()
}

impl System {
    /// A JetStream publish with a message id, waiting for the PubAck: the client knows the
    /// request is stored before anything is killed.
    pub async fn publish_acked(&self, body: &[u8], msg_id: &str) {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        self.js
            .publish_with_headers("orders.create", headers, body.to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Waits until `check` holds for the saga's state.
    pub async fn wait_saga(
        &self,
        id: &str,
        timeout: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.saga(id).await {
                if check(&s) {
                    return s;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "saga {id} never reached the expected state; now {:?}\n{}",
                self.saga(id).await,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends an operator command the way `nats req saga.ops.<id> '<json>'` does.
    pub async fn operator(&self, id: &str, body: Value) -> Value {
        let reply = self
            .client
            .request(topology::ops_subject(id), body.to_string().into())
            .await
            .unwrap();
        serde_json::from_slice(&reply.payload).unwrap()
    }
}

/// A mixed batch: `i % 3 == 0` completes (c-1), `1` fails on balance (c-2), `2` on stock (sku-3).
/// Returns (id, body, expected status, amount charged if completed, quantity reserved).
pub fn mixed_batch(prefix: &str, n: usize) -> Vec<(String, Vec<u8>, &'static str, i64, i64)> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i}");
            match i % 3 {
                0 => {
                    let price = 100 + i as i64;
                    (
                        id.clone(),
                        order(&id, "c-1", "sku-1", 1, price),
                        "completed",
                        price,
                        1,
                    )
                }
                1 => (
                    id.clone(),
                    order(&id, "c-2", "sku-1", 1, 10_000),
                    "compensated",
                    0,
                    0,
                ),
                _ => (
                    id.clone(),
                    order(&id, "c-3", "sku-3", 5, 10),
                    "compensated",
                    0,
                    0,
                ),
            }
        })
        .collect()
}

/// Waits for every saga of a [`mixed_batch`] and checks outcomes, order statuses and that money
/// and stock moved exactly once per completed order.
pub async fn check_mixed(sys: &System, batch: &[(String, Vec<u8>, &'static str, i64, i64)]) {
    let (mut charged, mut reserved) = (0, 0);
    for (id, _, want, amount, qty) in batch {
        let s = sys.wait_terminal(id, Duration::from_secs(90)).await;
        assert_eq!(s["status"].as_str().unwrap(), *want, "{id}: {s}");
        let order = sys.order_status(id).await;
        let want_order = if *want == "completed" {
            "APPROVED"
        } else {
            "CANCELLED"
        };
        assert_eq!(order, want_order, "{id}");
        charged += amount;
        reserved += qty;
    }
    assert_eq!(
        sys.balance("c-1").await,
        1_000_000 - charged,
        "each completed order charged once"
    );
    assert_eq!(sys.balance("c-2").await, 500, "nothing kept from c-2");
    assert_eq!(
        sys.balance("c-3").await,
        1_000_000,
        "every stock-short order refunded"
    );
    assert_eq!(sys.stock("sku-1").await, 1000 - reserved);
    assert_eq!(sys.stock("sku-3").await, 1);
}

/// A plain HTTP/1.1 GET on loopback: (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
