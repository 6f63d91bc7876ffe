//! Prometheus metrics: the text exposition format (0.0.4), written at each
//! scrape from the process's own state, and the HTTP endpoint that serves
//! `GET /metrics`.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The type of a metric family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    /// Only goes up (a name ending in `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations counted in buckets: samples `<name>_bucket` (with an
    /// `le` label, cumulative, the last `+Inf`), `<name>_sum` and
    /// `<name>_count`.
    Histogram,
}

impl Type {
    fn name(self) -> &'static str {
        match self {
            Type::Counter => "counter",
            Type::Gauge => "gauge",
            Type::Histogram => "histogram",
        }
    }
}

/// One scrape being written: families one after another, each with its
/// `# HELP` and `# TYPE` lines, then its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// A label value with `\`, `"` and line feeds escaped.
fn escape_label(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn write_value(value: f64, out: &mut String) {
    if value.is_nan() {
        out.push_str("NaN");
    } else if value == f64::INFINITY {
        out.push_str("+Inf");
    } else if value == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        let _ = write!(out, "{value}");
    }
}

impl Exposition {
    /// An empty scrape.
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Starts a family: its name, type and help. Its samples follow.
    pub fn family(&mut self, name: &str, kind: Type, help: &str) -> &mut Exposition {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.name());
        self
    }

    /// One sample: the metric's name, its labels and its value.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Exposition {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label(v, &mut self.out);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        write_value(value, &mut self.out);
        self.out.push('\n');
        self
    }

    /// A family of one sample without labels.
    pub fn single(&mut self, name: &str, kind: Type, help: &str, value: f64) -> &mut Exposition {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// The scrape's text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// The `metrics_listen` setting: an address, or `off`.
pub fn listen_setting(
    key: &'static str,
    value: Option<&str>,
    default: &str,
) -> Result<Option<SocketAddr>, crate::ConfigError> {
    match value.unwrap_or(default).trim() {
        "off" => Ok(None),
        v => crate::settings::listen_address(key, v).map(Some),
    }
}

/// Binds the metrics endpoint at `at` (`None`: none); the listener and the
/// address it got, or the address that could not be bound and why.
pub async fn bind(
    at: Option<SocketAddr>,
) -> Result<Option<(TcpListener, SocketAddr)>, (SocketAddr, std::io::Error)> {
    let Some(at) = at else {
        return Ok(None);
    };
    let listener = TcpListener::bind(at).await.map_err(|e| (at, e))?;
    let local = listener.local_addr().map_err(|e| (at, e))?;
    Ok(Some((listener, local)))
}

/// Largest request head read from a scraper.
const MAX_HEAD: usize = 8 << 10;

/// How long a scraper may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one scrape may take in all (request, rendering, answer): a
/// scraper that stops reading is dropped.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(30);

/// Scrapes answered at once; a connection beyond them is closed at once.
const MAX_SCRAPES: usize = 8;

/// Serves `GET /metrics` (HTTP/1.1, one request per connection) on
/// `listener` with the text `render` writes at each scrape, until the
/// task is dropped or aborted. Other paths get 404, other methods 405.
/// Each connection has [`SCRAPE_TIMEOUT`] in all; beyond [`MAX_SCRAPES`]
/// at once, connections are closed unanswered.
pub async fn serve<F, Fut>(listener: TcpListener, render: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send,
{
    let scrapes = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors or the like: try again shortly.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = scrapes.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(SCRAPE_TIMEOUT, answer(stream, render)).await;
            drop(permit);
        });
    }
}

async fn answer<F, Fut>(mut stream: TcpStream, render: F) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
        }
    })
    .await;
    if !matches!(complete, Ok(Ok(true))) {
        return Ok(());
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render().await,
        ),
        (_, "/metrics") => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_owned(),
        ),
        _ => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "metrics are at /metrics\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_written_and_escaped() {
        let mut e = Exposition::new();
        e.family("tandem_x_total", Type::Counter, "Things.\nMore.")
            .sample("tandem_x_total", &[("topic", "a\"b\\c\nd")], 3.0);
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP tandem_x_total Things.\\nMore.\n\
             # TYPE tandem_x_total counter\n\
             tandem_x_total{topic=\"a\\\"b\\\\c\\nd\"} 3\n"
        );
    }

    #[tokio::test]
    async fn the_endpoint_answers_metrics_and_refuses_the_rest() -> std::io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(serve(listener, || async { "a 1\n".to_owned() }));
        let ask = |request: &'static str| async move {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(request.as_bytes()).await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            Ok::<String, std::io::Error>(out)
        };
        let ok = ask("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("version=0.0.4"), "{ok}");
        assert!(ok.ends_with("\r\n\r\na 1\n"), "{ok}");
        let missing = ask("GET / HTTP/1.1\r\n\r\n").await?;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = ask("POST /metrics HTTP/1.1\r\n\r\n").await?;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        server.abort();
        Ok(())
    }
}
