//! `tandem publish`: one message per line of standard input, pipelined in
//! batches; prints `PARTITION OFFSET` for each acknowledged line, in input
//! order, so line i of the output acknowledges line i of the input. On the
//! first failed batch it stops and exits non-zero: what it printed is
//! exactly what is acknowledged (later batches may be stored too, but are
//! not claimed).

use std::io::Write;

use bytes::Bytes;
use tandem_proto::coordinator as pb;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::{connect, status};

/// Flags of `tandem publish`.
#[derive(Clone, Debug, clap::Args)]
pub struct PublishArgs {
    /// Topic to publish to.
    pub topic: String,
    /// Key of every message (picks the partition; keeps their order).
    #[arg(long)]
    pub key: Option<String>,
    /// A header of every message, as NAME=VALUE (repeat for more).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Each line is a JSON object as `tandem consume --json` prints it:
    /// `value`, and optionally `id`, `key`, `headers` (a list of `name` and
    /// `value`, or an object of NAME: VALUE) and `partition`; a byte string
    /// is a JSON string or `{"base64": "..."}`. `--key` and `--header` apply to lines that set
    /// no key or headers of their own.
    #[arg(long)]
    pub json: bool,
    /// Most lines per request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub in_flight: usize,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

/// A byte string of a JSON line: a string, or `{"base64": "..."}`.
fn json_bytes(v: &serde_json::Value, field: &str) -> anyhow::Result<Bytes> {
    use base64::Engine;
    if let Some(s) = v.as_str() {
        return Ok(Bytes::copy_from_slice(s.as_bytes()));
    }
    if let Some(b) = v.get("base64").and_then(|b| b.as_str()) {
        return Ok(Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|e| anyhow::anyhow!("{field}: not base64: {e}"))?,
        ));
    }
    anyhow::bail!("{field}: must be a string or {{\"base64\": \"...\"}}")
}

/// One message from a JSON line (see [`PublishArgs::json`]).
fn json_message(line: &[u8], defaults: &pb::Message) -> anyhow::Result<pb::Message> {
    let v: serde_json::Value = serde_json::from_slice(line)?;
    let obj = v
        .as_object()
        .ok_or_else(|| anyhow::anyhow!("not a JSON object"))?;
    for k in obj.keys() {
        if ![
            "id",
            "key",
            "value",
            "headers",
            "partition",
            "offset",
            "timestamp_ms",
        ]
        .contains(&k.as_str())
        {
            anyhow::bail!("unknown field {k:?}");
        }
    }
    let mut m = defaults.clone();
    m.value = json_bytes(
        obj.get("value")
            .ok_or_else(|| anyhow::anyhow!("value: is required"))?,
        "value",
    )?;
    if let Some(id) = obj.get("id").filter(|v| !v.is_null()) {
        m.id = id
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("id: must be a string"))?
            .to_owned();
    }
    if let Some(k) = obj.get("key").filter(|v| !v.is_null()) {
        m.key = Some(json_bytes(k, "key")?);
    }
    if let Some(p) = obj.get("partition").filter(|v| !v.is_null()) {
        m.partition = Some(
            p.as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| anyhow::anyhow!("partition: must be a partition number"))?,
        );
    }
    if let Some(map) = obj.get("headers").and_then(|v| v.as_object()) {
        // {"NAME": VALUE, ...}, the short form
        m.headers = map
            .iter()
            .map(|(name, value)| {
                Ok(pb::Header {
                    name: name.clone(),
                    value: json_bytes(value, &format!("headers.{name}"))?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
    } else if let Some(hs) = obj.get("headers").filter(|v| !v.is_null()) {
        let hs = hs.as_array().ok_or_else(|| {
            anyhow::anyhow!(
                "headers: must be a list of {{\"name\", \"value\"}} or an object of NAME: VALUE"
            )
        })?;
        m.headers = hs
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let name = h
                    .get("name")
                    .and_then(|n| n.as_str())
                    .ok_or_else(|| anyhow::anyhow!("headers[{i}].name: must be a string"))?;
                let value = h
                    .get("value")
                    .ok_or_else(|| anyhow::anyhow!("headers[{i}].value: is required"))?;
                Ok(pb::Header {
                    name: name.to_owned(),
                    value: json_bytes(value, &format!("headers[{i}].value"))?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
    }
    Ok(m)
}

type Pending = JoinHandle<Result<Vec<pb::MessagePosition>, tonic::Status>>;

/// Publishes each line of `input`; writes acknowledgements to `out`.
/// Returns the number of lines acknowledged.
pub async fn publish(
    url: &str,
    args: PublishArgs,
    mut input: impl AsyncBufRead + Unpin + Send + 'static,
    out: &mut impl Write,
) -> anyhow::Result<u64> {
    let client = connect(url).await?;
    let (tx, mut rx) = mpsc::channel::<Pending>(args.in_flight.max(1));
    let defaults = pb::Message {
        key: args.key.map(Bytes::from),
        headers: args
            .headers
            .into_iter()
            .map(|(name, value)| pb::Header {
                name,
                value: Bytes::from(value),
            })
            .collect(),
        ..Default::default()
    };
    let as_json = args.json;
    let batch_size = args.batch.clamp(1, 100_000);
    let topic = args.topic;
    let reader: JoinHandle<anyhow::Result<()>> = tokio::spawn(async move {
        let mut line = Vec::new();
        let mut batch = Vec::with_capacity(batch_size);
        let mut bytes = 0;
        let mut number = 0u64;
        loop {
            line.clear();
            let n = input.read_until(b'\n', &mut line).await?;
            if n > 0 {
                if line.last() == Some(&b'\n') {
                    line.pop();
                }
                number += 1;
                bytes += line.len();
                batch.push(if as_json {
                    json_message(&line, &defaults)
                        .map_err(|e| e.context(format!("line {number}")))?
                } else {
                    pb::Message {
                        value: Bytes::copy_from_slice(&line),
                        ..defaults.clone()
                    }
                });
            }
            if !batch.is_empty() && (n == 0 || batch.len() >= batch_size || bytes >= 4 << 20) {
                let mut c = client.clone();
                let req = pb::PublishRequest {
                    topic: topic.clone(),
                    messages: std::mem::replace(&mut batch, Vec::with_capacity(batch_size)),
                };
                bytes = 0;
                let call =
                    tokio::spawn(
                        async move { c.publish(req).await.map(|r| r.into_inner().positions) },
                    );
                if tx.send(call).await.is_err() {
                    return Ok(()); // the printer stopped at a failure
                }
            }
            if n == 0 {
                return Ok(());
            }
        }
    });
    let mut acknowledged = 0u64;
    while let Some(call) = rx.recv().await {
        let positions = match call.await {
            Ok(Ok(p)) => p,
            Ok(Err(s)) => {
                reader.abort();
                return Err(status(s).context(format!(
                    "publish failed after {acknowledged} acknowledged lines"
                )));
            }
            Err(e) => {
                reader.abort();
                return Err(anyhow::anyhow!(e).context("publish task failed"));
            }
        };
        for p in &positions {
            writeln!(out, "{} {}", p.partition, p.offset)?;
        }
        out.flush()?;
        acknowledged += positions.len() as u64;
    }
    reader.await??;
    Ok(acknowledged)
}
