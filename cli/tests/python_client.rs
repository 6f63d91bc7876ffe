//! Any language can use Tandem: a Python program (grpcio, stubs generated
//! from `proto/`) places orders through the example order service and, as an
//! app behind its own sidecar, publishes and consumes through it, the app
//! and its sidecar calling each other on Unix sockets. The
//! virtual environment comes from `scripts/test.sh` (`TANDEM_TEST_PYTHON`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use std::process::{Command, Stdio};
use std::time::Duration;

use tandem_examples::process::Process;

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

/// The folder the client's stubs were generated in, from its line saying so.
fn stubs_folder(line: &str) -> Option<PathBuf> {
    line.strip_prefix("stubs generated in ")
        .map(|folder| PathBuf::from(folder.trim()))
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn a_python_client_places_orders_publishes_and_consumes() -> anyhow::Result<()> {
    let Ok(python) = std::env::var("TANDEM_TEST_PYTHON") else {
        assert!(
            std::env::var_os("TANDEM_REQUIRE_PYTHON").is_none(),
            "TANDEM_TEST_PYTHON is not set but the Python client test is required"
        );
        eprintln!("skipped: no TANDEM_TEST_PYTHON (scripts/test.sh provides one)");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let d = |f: &str| dir.path().join(f).display().to_string();
    let bin = Path::new(TANDEM);
    let coordinator = Process::start(
        "coordinator",
        bin,
        &args(&[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &d("coordinator"),
        ]),
        &[],
        dir.path(),
    )?;
    let sidecar = |service: &str, db: &str, app: Option<&str>, listen: &str| {
        let mut a = args(&[
            "sidecar",
            "--listen",
            listen,
            "--coordinator",
            &coordinator.url(),
            "--service",
            service,
            "--db",
            &d(db),
        ]);
        if let Some(url) = app {
            a.extend(["--app".to_owned(), url.to_owned()]);
        }
        Process::start(&format!("{service}-sidecar"), bin, &a, &[], dir.path())
    };
    let orders_sidecar = sidecar("orders", "orders.db", None, "127.0.0.1:0")?;
    let orders = Process::start(
        "order-service",
        bin,
        &args(&[
            "example-order-service",
            "--listen",
            "127.0.0.1:0",
            "--db",
            &d("orders.db"),
            "--sidecar",
            &orders_sidecar.url(),
        ]),
        &[],
        dir.path(),
    )?;
    // The Python app serves its callbacks on a Unix socket and says which;
    // its sidecar is started for it, on a socket of its own, handed back.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut child = Command::new(python)
        .current_dir(root.join("clients/python"))
        .arg("test_client.py")
        .args(["--coordinator", &coordinator.addr.to_string()])
        .args(["--order-service", &orders.addr.to_string()])
        .args(["--db", &d("py.db")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or_else(|| anyhow::anyhow!("stdin"))?;
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdout"))?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("python: {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut py_sidecar = None;
    let mut generated = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("the Python client did not finish within 120 s");
        }
        while let Ok(line) = lines.try_recv() {
            generated = generated.or_else(|| stubs_folder(&line));
            if let Some(app) = line.strip_prefix("app listening on ") {
                let listen = format!("unix:{}", d("py-sidecar.sock"));
                let s = sidecar("py-app", "py.db", Some(app.trim()), &listen)?;
                writeln!(stdin, "{}", s.listening)?;
                py_sidecar = Some(s);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        for p in [
            Some(&coordinator),
            Some(&orders_sidecar),
            Some(&orders),
            py_sidecar.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            eprintln!("---- {} log ----\n{}", p.name(), p.log_tail());
        }
    }
    assert!(status.success(), "the Python client failed: {status:?}");
    // Lines printed just before the exit may still be on their way.
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(5)) {
        generated = generated.or_else(|| stubs_folder(&line));
    }
    let generated = generated.context("the client did not say where its stubs were generated")?;
    let named = generated
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("tandem-py-"));
    assert!(
        generated.is_absolute() && named,
        "not the stubs' temporary folder: {}",
        generated.display()
    );
    assert!(
        !generated.exists(),
        "the generated stubs were left in {}",
        generated.display()
    );
    Ok(())
}
