//! The Kubernetes manifests in `deploy/`: every overlay renders with
//! `kubectl kustomize`, validates against the schemas of a current
//! Kubernetes with `kubernetes-validate --strict` (offline), follows the
//! rules of `deploy/check.py` (probes and resources on every container,
//! non-root, fsGroup, a native sidecar, a ServiceAccount each, Recreate on
//! ReadWriteOnce volumes, the NetworkPolicy, certificates for every
//! mounted Secret), and its settings load with Tandem's own settings code.
//!
//! The test command installs kubectl and a Python environment with
//! kubernetes-validate (`TANDEM_TEST_KUBECTL`, `TANDEM_TEST_KUBE_PYTHON`);
//! with `TANDEM_REQUIRE_KUBE` set, the test fails without them.

use std::path::{Path, PathBuf};
use std::process::Command;

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Kubernetes version whose schemas the manifests are validated against.
const KUBERNETES: &str = "1.37.0";

fn tools() -> Option<(String, String)> {
    match (
        std::env::var("TANDEM_TEST_KUBECTL"),
        std::env::var("TANDEM_TEST_KUBE_PYTHON"),
    ) {
        (Ok(k), Ok(p)) => Some((k, p)),
        _ => {
            assert!(
                std::env::var_os("TANDEM_REQUIRE_KUBE").is_none(),
                "TANDEM_TEST_KUBECTL and TANDEM_TEST_KUBE_PYTHON are not set but the manifest tests are required"
            );
            eprintln!("skipped: no kubectl or kubernetes-validate (scripts/test.sh provides them)");
            None
        }
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the cli crate is in the repository")
        .to_owned()
}

/// Runs `cmd`: its success, standard output and standard error.
fn run(cmd: &mut Command) -> TestResult<(bool, String, String)> {
    let out = cmd.output()?;
    Ok((
        out.status.success(),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

fn render(kubectl: &str, overlay: &str, to: &Path) -> TestResult<PathBuf> {
    let dir = repo().join("deploy/overlays").join(overlay);
    let (ok, out, err) = run(Command::new(kubectl).arg("kustomize").arg(&dir))?;
    assert!(ok, "kubectl kustomize {}: {err}", dir.display());
    let file = to.join(format!("{overlay}.yaml"));
    std::fs::write(&file, out)?;
    Ok(file)
}

fn validate(python: &str, file: &Path) -> TestResult<(bool, String)> {
    let (ok, out, err) = run(Command::new(python)
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--quiet",
            "-k",
            KUBERNETES,
        ])
        .arg(file))?;
    Ok((ok, out + &err))
}

fn rules(
    python: &str,
    file: &Path,
    certificates: &Path,
    extract: &Path,
) -> TestResult<(bool, String)> {
    let (ok, out, err) = run(Command::new(python)
        .arg(repo().join("deploy/check.py"))
        .arg(file)
        .arg("--certificates")
        .arg(certificates)
        .arg("--extract")
        .arg(extract))?;
    Ok((ok, out + &err))
}

#[test]
fn every_overlay_renders_validates_and_follows_the_rules() -> TestResult {
    let Some((kubectl, python)) = tools() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let certificates = render(&kubectl, "cert-manager", dir.path())?;
    // cert-manager's kinds have no schema here (they are CRDs): validated
    // for what is known, and their fields checked by the rules.
    let (ok, said) = validate(&python, &certificates)?;
    assert!(ok, "{said}");
    for overlay in ["single", "replicated"] {
        let file = render(&kubectl, overlay, dir.path())?;
        let (ok, said) = validate(&python, &file)?;
        assert!(ok, "{overlay}: {said}");
        let extracted = dir.path().join(overlay);
        let (ok, said) = rules(&python, &file, &certificates, &extracted)?;
        assert!(ok, "{overlay}: {said}");
        assert!(said.contains("follow the rules"), "{said}");

        // What the processes would read loads with their own code.
        let envs: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(extracted.join("env.json"))?)?;
        let containers = envs.as_object().ok_or("env.json holds no object")?;
        assert!(
            containers.keys().any(|k| k.ends_with("/coordinator"))
                && containers.keys().any(|k| k.ends_with("/sidecar")),
            "{overlay}: {:?}",
            containers.keys()
        );
        for (name, c) in containers {
            let env: Vec<(String, String)> = c["env"]
                .as_object()
                .ok_or("no env")?
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            match c["args"][0].as_str() {
                Some("coordinator") => {
                    let args = tandem_coordinator::CoordinatorArgs {
                        config: Some(extracted.join("coordinator.toml")),
                        ..Default::default()
                    };
                    let config = tandem_coordinator::Config::load(&args, env)
                        .map_err(|e| format!("{overlay} {name}: {e}"))?;
                    assert!(config.tls.is_some(), "{overlay} {name}: no TLS");
                    assert!(
                        config.authorization.configured(),
                        "{overlay} {name}: no authorization"
                    );
                }
                Some("sidecar") => {
                    let config = tandem_sidecar::Config::load(&Default::default(), env)
                        .map_err(|e| format!("{overlay} {name}: {e}"))?;
                    assert!(config.tls.is_some(), "{overlay} {name}: no TLS");
                    assert!(
                        config.coordinator.iter().all(|u| u.starts_with("https://")),
                        "{overlay} {name}: {:?}",
                        config.coordinator
                    );
                }
                other => return Err(format!("{name}: unexpected process {other:?}").into()),
            }
        }
    }
    Ok(())
}

/// The checks can fail: a manifest broken on purpose is caught by both.
#[test]
fn a_broken_manifest_is_caught() -> TestResult {
    let Some((kubectl, python)) = tools() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let certificates = render(&kubectl, "cert-manager", dir.path())?;
    let good = std::fs::read_to_string(render(&kubectl, "single", dir.path())?)?;

    let unknown_field = dir.path().join("unknown-field.yaml");
    std::fs::write(
        &unknown_field,
        good.replacen(
            "restartPolicy: Always",
            "restartPolicy: Always\n        restartPolcy: Always",
            1,
        ),
    )?;
    let (ok, said) = validate(&python, &unknown_field)?;
    assert!(!ok && said.contains("restartPolcy"), "{said}");

    let weakened = dir.path().join("weakened.yaml");
    std::fs::write(
        &weakened,
        good.replace("fsGroup: 10001", "")
            .replace(
                "readOnlyRootFilesystem: true",
                "readOnlyRootFilesystem: false",
            )
            .replace("type: Recreate", "type: RollingUpdate"),
    )?;
    let (ok, said) = rules(&python, &weakened, &certificates, &dir.path().join("x"))?;
    assert!(!ok, "{said}");
    for broken in [
        "fsGroup is not set",
        "writable root filesystem",
        "ReadWriteOnce volume but its strategy is not Recreate",
    ] {
        assert!(said.contains(broken), "{broken}: {said}");
    }

    // A sidecar acting for a service its certificate does not name, and a
    // NetworkPolicy rule letting every pod in.
    let mismatched = dir.path().join("mismatched.yaml");
    std::fs::write(
        &mismatched,
        good.replacen(
            "name: TANDEM_SIDECAR_SERVICE\n          value: orders",
            "name: TANDEM_SIDECAR_SERVICE\n          value: payments",
            1,
        )
        .replacen("  ingress:\n", "  ingress:\n  - {}\n", 1),
    )?;
    let (ok, said) = rules(&python, &mismatched, &certificates, &dir.path().join("y"))?;
    assert!(!ok, "{said}");
    for broken in [
        "its sidecar acts for 'payments' but its certificate names",
        "lets every pod reach the gRPC port",
    ] {
        assert!(said.contains(broken), "{broken}: {said}");
    }
    Ok(())
}
