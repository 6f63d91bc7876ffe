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
    /// Most lines per request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub in_flight: usize,
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
    let key = args.key.map(Bytes::from);
    let batch_size = args.batch.clamp(1, 100_000);
    let topic = args.topic;
    let reader: JoinHandle<anyhow::Result<()>> = tokio::spawn(async move {
        let mut line = Vec::new();
        let mut batch = Vec::with_capacity(batch_size);
        let mut bytes = 0;
        loop {
            line.clear();
            let n = input.read_until(b'\n', &mut line).await?;
            if n > 0 {
                if line.last() == Some(&b'\n') {
                    line.pop();
                }
                bytes += line.len();
                batch.push(pb::Message {
                    id: String::new(),
                    key: key.clone(),
                    value: Bytes::copy_from_slice(&line),
                    headers: Vec::new(),
                    partition: None,
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
