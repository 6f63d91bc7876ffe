//! gRPC over a Unix domain socket: the app ↔ sidecar hop, which never
//! leaves the pod. A socket is named `unix:PATH` in settings and URLs.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

/// The socket path a `unix:PATH` setting names (`None` for anything else).
pub fn socket_path(value: &str) -> Option<PathBuf> {
    let path = value.strip_prefix("unix:")?;
    // (`unix:///run/x.sock` is the URL form of `unix:/run/x.sock`.)
    let path = path.strip_prefix("//").unwrap_or(path);
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// Binds a listening socket at `path`, replacing a socket file a previous
/// process left there (any other kind of file is left alone: an error).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running process", path.display()),
                ));
            }
            std::fs::remove_file(path)?
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// Opens the connections of a [`Channel`] to one socket.
#[derive(Clone, Debug)]
struct Connector(PathBuf);

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UnixStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(UnixStream::connect(path).await?)) })
    }
}

/// A channel to the gRPC server on the socket at `path`, connecting when
/// first used.
pub fn lazy_channel(path: PathBuf) -> Channel {
    // (The URI only fills in the requests' :authority.)
    Endpoint::from_static("http://localhost").connect_with_connector_lazy(Connector(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_settings_name_a_path() {
        assert_eq!(socket_path("unix:/run/s.sock"), Some("/run/s.sock".into()));
        assert_eq!(
            socket_path("unix:///run/s.sock"),
            Some("/run/s.sock".into())
        );
        assert_eq!(socket_path("unix:rel.sock"), Some("rel.sock".into()));
        assert_eq!(socket_path("unix:"), None);
        assert_eq!(socket_path("127.0.0.1:7410"), None);
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_other_files_are_not() -> io::Result<()> {
        let dir = std::env::temp_dir().join(format!("tandem-unix-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let sock = dir.join("s.sock");
        let live = bind(&sock)?;
        // A socket a process listens on is not taken over.
        assert!(bind(&sock).is_err());
        drop(live);
        // The first listener is gone but its file stays: bound again.
        let listener = bind(&sock)?;
        let (connected, accepted) = tokio::join!(UnixStream::connect(&sock), listener.accept());
        connected?;
        accepted?;
        let plain = dir.join("file");
        std::fs::write(&plain, b"x")?;
        assert!(bind(&plain).is_err());
        assert!(plain.exists());
        std::fs::remove_dir_all(&dir)
    }
}
