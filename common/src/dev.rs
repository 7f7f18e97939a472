//! Development credentials: the NATS users `nats.conf` defines and the passwords the tests and
//! `scripts/run.sh` give them (`dev-<user>`, overridable per user with
//! `JETSAGA_<USER>_PASSWORD`). Never use these outside a development machine; docker-compose.yml
//! and real deployments set their own.

/// Every user of `nats.conf`, one per process kind.
pub const USERS: [&str; 6] = [
    "orchestrator",
    "order",
    "payment",
    "inventory",
    "admin",
    "client",
];

/// Name of the environment variable `nats.conf` reads a user's password from.
pub fn password_var(user: &str) -> String {
    format!("JETSAGA_{}_PASSWORD", user.to_uppercase())
}

/// The development password of `user`.
pub fn password(user: &str) -> String {
    std::env::var(password_var(user)).unwrap_or_else(|_| format!("dev-{user}"))
}

/// Environment for nats-server: every user's password variable.
pub fn server_env() -> Vec<(String, String)> {
    USERS
        .iter()
        .map(|u| (password_var(u), password(u)))
        .collect()
}

/// Environment for a process that connects as `user`.
pub fn credentials(user: &str) -> Vec<(String, String)> {
    vec![
        ("NATS_USER".to_string(), user.to_string()),
        ("NATS_PASSWORD".to_string(), password(user)),
    ]
}

/// Connects to `url` as `user` with its development password.
pub async fn connect_as(
    url: &str,
    user: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::with_user_and_password(user.to_string(), password(user))
        .name(format!("jetsaga-test-{user}"))
        .connect(url)
        .await
}
