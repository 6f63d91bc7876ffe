//! `tandem consume`: joins a consumer group, prints messages, and
//! acknowledges each batch only after it was printed and flushed. Credit
//! never exceeds what `--max` still allows, so nothing beyond it is
//! delivered; on exit the request side closes and the command waits for the
//! coordinator to end the session, which commits what was acknowledged.

use std::io::Write;
use std::time::Duration;

use serde_json::json;
use tandem_proto::coordinator as pb;
use tokio::sync::mpsc;

use crate::{bytes_json, connect, status};

/// Flags of `tandem consume`.
#[derive(Clone, Debug, clap::Args)]
pub struct ConsumeArgs {
    /// Topic to consume.
    pub topic: String,
    /// Consumer group.
    #[arg(long)]
    pub group: String,
    /// Where to start when the group has no committed offset.
    #[arg(long, value_enum, default_value = "latest")]
    pub from: From,
    /// Exit after this many messages.
    #[arg(long)]
    pub max: Option<u64>,
    /// One JSON object per line: id, partition, offset, key, value, headers.
    #[arg(long)]
    pub json: bool,
}

/// Start position for a new group.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum From {
    /// The oldest stored message.
    Earliest,
    /// Only messages published from now on.
    Latest,
}

const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

fn print(out: &mut impl Write, d: &pb::Delivery, as_json: bool) -> std::io::Result<()> {
    let m = d.message.clone().unwrap_or_default();
    if as_json {
        let v = json!({
            "id": m.id,
            "partition": d.partition,
            "offset": d.offset,
            "key": m.key.as_deref().map(bytes_json),
            "value": bytes_json(&m.value),
            "headers": m.headers.iter().map(|h| json!({"name": h.name, "value": bytes_json(&h.value)})).collect::<Vec<_>>(),
            "timestamp_ms": d.timestamp_ms,
        });
        writeln!(out, "{v}")
    } else {
        out.write_all(&m.value)?;
        out.write_all(b"\n")
    }
}

/// Consumes until `--max` messages were printed (or forever, until
/// `stop` resolves). Returns the number of messages printed.
pub async fn consume(
    url: &str,
    args: ConsumeArgs,
    out: &mut impl Write,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<u64> {
    let mut client = connect(url).await?;
    let max = args.max.unwrap_or(u64::MAX);
    if max == 0 {
        return Ok(0);
    }
    let window = 1000u64.min(max);
    let subscribe = pb::ConsumeRequest {
        kind: Some(pb::consume_request::Kind::Subscribe(pb::Subscribe {
            revoke_timeout_ms: 0,
            topic: args.topic.clone(),
            group: args.group.clone(),
            start_from: match args.from {
                From::Earliest => pb::StartFrom::Earliest,
                From::Latest => pb::StartFrom::Latest,
            } as i32,
            initial_credit: window as u32,
            session_timeout_ms: SESSION_TIMEOUT.as_millis() as u32,
            client_id: "tandem-cli".into(),
        })),
    };
    // A replica that does not own the topic's shard names the one that
    // does: the stream is opened there (a few times at most, while the
    // shard moves).
    let mut hops = 0;
    let (tx, mut responses) = loop {
        let (tx, rx) = mpsc::channel(64);
        tx.send(subscribe.clone()).await?;
        match client
            .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(r) => break (tx, r.into_inner()),
            Err(s) if s.code() == tonic::Code::Unavailable && hops < 5 => {
                let Some(owner) = s
                    .metadata()
                    .get(tandem_coordinator::OWNER_METADATA)
                    .and_then(|v| v.to_str().ok())
                else {
                    return Err(status(s));
                };
                client = connect(&crate::replica_url(owner)).await?;
                hops += 1;
            }
            Err(s) => return Err(status(s)),
        }
    };
    let mut granted = window;
    let mut printed = 0u64;
    let mut heartbeat = tokio::time::interval(SESSION_TIMEOUT / 3);
    tokio::pin!(stop);
    while printed < max {
        let msg = tokio::select! {
            m = responses.message() => m.map_err(status)?,
            _ = heartbeat.tick() => {
                let _ = tx.send(pb::ConsumeRequest { kind: Some(pb::consume_request::Kind::Heartbeat(pb::Heartbeat {})) }).await;
                continue;
            }
            () = &mut stop => break,
        };
        let Some(msg) = msg else {
            anyhow::bail!("the coordinator ended the session");
        };
        let Some(pb::consume_response::Kind::Deliveries(d)) = msg.kind else {
            continue;
        };
        let take = d.deliveries.len().min((max - printed) as usize);
        for delivery in &d.deliveries[..take] {
            print(out, delivery, args.json)?;
        }
        out.flush()?;
        printed += take as u64;
        let acked = pb::Ack {
            offsets: d.deliveries[..take]
                .iter()
                .map(|d| pb::AckedOffset {
                    partition: d.partition,
                    offset: d.offset,
                    epoch: d.epoch,
                })
                .collect(),
        };
        tx.send(pb::ConsumeRequest {
            kind: Some(pb::consume_request::Kind::Ack(acked)),
        })
        .await?;
        let more = (take as u64).min(max - granted.min(max));
        if more > 0 {
            granted += more;
            tx.send(pb::ConsumeRequest {
                kind: Some(pb::consume_request::Kind::Credit(pb::Credit {
                    messages: more as u32,
                })),
            })
            .await?;
        }
    }
    // Close our side; the coordinator commits the acks and ends the stream.
    drop(tx);
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(_m) = responses.message().await? {}
        Ok::<_, tonic::Status>(())
    })
    .await;
    match drained {
        Ok(Ok(())) => Ok(printed),
        Ok(Err(s)) => Err(status(s).context("ending the session")),
        Err(_) => anyhow::bail!("the coordinator did not end the session within 30 s"),
    }
}
