//! `jetsaga-payment`: the payment service of the example order saga. All the work is in
//! `jetsaga_participants`; see `--help` for flags and their environment variables.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    jetsaga_participants::cli::main(jetsaga_participants::services::payment::Payment).await?;
    Ok(())
}
