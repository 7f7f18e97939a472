//! TLS end to end: a certificate authority and a server certificate generated at test time,
//! nats-server started with the repo's nats.conf plus a `tls` block, and the real orchestrator and
//! services connecting with `NATS_CA_FILE`. A saga completes; a client that does not trust the CA
//! cannot connect.

mod support;

use std::time::Duration;

use jetsaga_common::{
    dev,
    testkit::{bin, workspace_root, NatsServer, Proc},
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_completes_over_tls_and_untrusted_clients_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_cert =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
    let path = |n: &str| dir.path().join(n);
    std::fs::write(path("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(path("server.pem"), server_cert.pem()).unwrap();
    std::fs::write(path("server-key.pem"), server_key.serialize_pem()).unwrap();
    // The shipped configuration, with TLS turned on the way the README describes.
    let conf = std::fs::read_to_string(workspace_root().join("nats.conf")).unwrap();
    let conf = format!(
        "{conf}\ntls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n",
        path("server.pem").display(),
        path("server-key.pem").display()
    );
    std::fs::write(path("nats-tls.conf"), conf).unwrap();
    // Only this test runs in this binary, so the variable cannot leak into another test.
    std::env::set_var("JETSAGA_NATS_CONF", path("nats-tls.conf"));
    let nats = NatsServer::start();
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let env = |user: &str, extra: Vec<(String, String)>| {
        let mut e = vec![
            ("NATS_URL".to_string(), url.clone()),
            (
                "NATS_CA_FILE".to_string(),
                path("ca.pem").display().to_string(),
            ),
        ];
        e.extend(dev::credentials(user));
        e.extend(extra);
        e
    };
    let mut procs = vec![Proc::spawn(
        "orchestrator",
        bin("jetsaga-orchestrator"),
        vec![],
        env("orchestrator", vec![]),
        path("orchestrator.log"),
    )];
    let seed = path("seed.json");
    std::fs::write(&seed, support::seed().to_string()).unwrap();
    for svc in support::SERVICES {
        let db = path(&format!("{svc}.sqlite")).display().to_string();
        procs.push(Proc::spawn(
            svc,
            bin(&format!("jetsaga-{svc}")),
            vec![],
            env(
                svc,
                vec![
                    ("JETSAGA_DB".into(), db),
                    ("JETSAGA_SEED".into(), seed.display().to_string()),
                ],
            ),
            path(&format!("{svc}.log")),
        ));
    }
    // A client without the CA is refused (the certificate cannot be verified).
    let untrusted = tokio::time::timeout(
        Duration::from_secs(10),
        async_nats::ConnectOptions::with_user_and_password("admin".into(), dev::password("admin"))
            .require_tls(true)
            .connect(&url),
    )
    .await;
    assert!(
        !matches!(untrusted, Ok(Ok(_))),
        "an untrusting client must not connect"
    );
    // The CLI, trusting the CA, submits an order and waits for it.
    let out = tokio::task::spawn_blocking({
        let url = url.clone();
        let ca = path("ca.pem");
        move || {
            let body = String::from_utf8(support::order("tls-1", "c-1", "sku-1", 1, 42)).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let out = std::process::Command::new(bin("jetsaga"))
                    .args(["submit", "--wait", "--timeout", "30", &body])
                    .env("NATS_URL", &url)
                    .env("NATS_CA_FILE", &ca)
                    .envs(dev::credentials("admin"))
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout).to_string()
                    + &String::from_utf8_lossy(&out.stderr);
                // Until the orchestrator has created its streams, nobody answers the request.
                if out.status.success() || std::time::Instant::now() > deadline {
                    return text;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    })
    .await
    .unwrap();
    let logs: String = procs
        .iter()
        .map(|p| format!("--- {}\n{}", p.name, p.output()))
        .collect();
    assert!(out.contains("completed"), "saga over TLS: {out}\n{logs}");
}
