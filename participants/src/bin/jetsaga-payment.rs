//! `jetsaga-payment`: the payment service of the example order saga. All the work is in
//! `jetsaga_participants`; see `--help` for flags and their environment variables.

/// mimalloc instead of glibc malloc: the profile under load showed about half of the CPU in
/// malloc/free (JSON states and messages are allocation-heavy).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    jetsaga_participants::cli::main(jetsaga_participants::services::payment::Payment).await?;
    Ok(())
}
