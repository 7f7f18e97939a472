//! Dead-lettering: a message that can never be processed is copied, with the reason, to the
//! `JETSAGA_DLQ` stream and then terminated, so it is neither lost nor redelivered forever.

use async_nats::{header::HeaderMap, jetstream};

use crate::protocol::{DLQ_REASON, DLQ_SOURCE_SEQ, DLQ_SOURCE_STREAM, DLQ_SOURCE_SUBJECT};

/// Longest reason kept in the header (headers must stay small).
const MAX_REASON: usize = 512;

/// Copies `msg` to `saga.dlq.<kind>` with the reason and origin in headers, waiting for the PubAck,
/// then terminates the original. If the copy fails the original is left unacked: it comes back and
/// is dead-lettered again (the copy's message id `dlq.<stream>.<seq>` makes that idempotent).
pub async fn dead_letter(
    js: &jetstream::Context,
    kind: &str,
    msg: &jetstream::Message,
    reason: &str,
) -> Result<(), async_nats::Error> {
    let mut headers = HeaderMap::new();
    let mut reason_short: String = reason.chars().take(MAX_REASON).collect();
    // Header values cannot hold line breaks.
    reason_short.retain(|c| c != '\r' && c != '\n');
    headers.insert(DLQ_REASON, reason_short.as_str());
    headers.insert(DLQ_SOURCE_SUBJECT, msg.subject.as_str());
    let (stream, seq) = match msg.info() {
        Ok(info) => (info.stream.to_string(), info.stream_sequence),
        Err(_) => ("unknown".to_string(), 0),
    };
    headers.insert(DLQ_SOURCE_STREAM, stream.as_str());
    headers.insert(DLQ_SOURCE_SEQ, seq.to_string().as_str());
    let id = format!("dlq.{stream}.{seq}");
    crate::nats::publish(
        js,
        format!("saga.dlq.{kind}"),
        &id,
        headers,
        msg.payload.clone(),
    )
    .await?;
    msg.ack_with(jetstream::AckKind::Term).await?;
    Ok(())
}
