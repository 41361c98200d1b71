//! `deploy/kubernetes` rendered and checked offline: each flavour's kustomization rendered by
//! the kubectl that `scripts/bootstrap` installs (Debian's, kustomize 2) and by any other
//! kubectl on the machine; every object validated strictly against the schema of a pinned
//! Kubernetes release (PyPI's kubernetes-validate); the cross-references no schema checks
//! (Secrets and keys, claims, Services and their selectors and ports, the ring's headless
//! Service, network policies, non-root pods); and every flag the containers and probes pass
//! to Ladder's binaries, which must exist, at the path the container image installs them.

use ladder_deploy::{deploy_dir, run_ok};
use ladder_testkit::{binary, make_certificates, venv_python};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The release whose schema the objects must satisfy: the oldest of the maintained ones the
/// manifests use features of (gRPC probes, policy/v1, appProtocol all predate it).
const KUBERNETES_VERSION: &str = "1.33.0";
const FLAVOURS: [&str; 2] = ["single", "ha"];

/// The kubectls to render with: the bootstrap's, and the one on the PATH if there is one.
fn kubectls() -> Vec<PathBuf> {
    let installed = venv_python().with_file_name("kubectl");
    assert!(
        installed.exists(),
        "{} is missing: run scripts/bootstrap",
        installed.display()
    );
    let mut all = vec![installed];
    if Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        all.push(PathBuf::from("kubectl"));
    }
    all
}

/// A copy of deploy/kubernetes with the Secrets' files a user creates.
fn with_secrets(dir: &Path) -> PathBuf {
    let copy = dir.join("kubernetes");
    run_ok(
        Command::new("cp")
            .arg("-r")
            .arg(deploy_dir().join("kubernetes"))
            .arg(&copy),
    );
    let secrets = copy.join("base/secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let (ca, cert, key) = make_certificates(
        dir,
        &["DNS:ladder-coordinator", "DNS:localhost", "IP:127.0.0.1"],
    );
    for (from, to) in [(&ca, "ca.crt"), (&cert, "tls.crt"), (&key, "tls.key")] {
        std::fs::copy(from, secrets.join(to)).unwrap();
    }
    std::fs::write(secrets.join("submit-token"), "submit").unwrap();
    std::fs::write(secrets.join("worker-token"), "worker").unwrap();
    // etcd's own CA, its members' certificate and the coordinators' client certificate.
    let etcd = dir.join("etcd-certificates");
    std::fs::create_dir_all(&etcd).unwrap();
    let (ca, cert, key) = make_certificates(&etcd, &["DNS:*.ladder-etcd", "DNS:ladder-etcd"]);
    let secrets = copy.join("ha/secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    for (from, to) in [
        (&ca, "etcd-ca.crt"),
        (&cert, "etcd.crt"),
        (&key, "etcd.key"),
        (&cert, "coordinator-etcd.crt"),
        (&key, "coordinator-etcd.key"),
    ] {
        std::fs::copy(from, secrets.join(to)).unwrap();
    }
    copy
}

/// The flags of `words` (`--name` of `--name=value`; the subcommand, if any, is the first
/// word that is not one), checked against the binary's `--help`.
fn check_flags(words: &[String], installed: &[String], where_: &str) {
    let program = Path::new(&words[0]);
    assert!(
        installed.contains(&words[0]),
        "{where_}: {} is not where the image installs the binaries ({installed:?})",
        program.display()
    );
    let name = program.file_name().unwrap().to_str().unwrap();
    let mut help = Command::new(binary(name));
    let subcommand = words[1..].iter().find(|w| !w.starts_with("--"));
    if let Some(sub) = subcommand {
        help.arg(sub);
    }
    let help = run_ok(help.arg("--help"));
    for word in &words[1..] {
        if let Some(flag) = word.strip_prefix("--") {
            let flag = flag.split('=').next().unwrap();
            assert!(
                help.contains(&format!("--{flag} ")) || help.contains(&format!("--{flag}\n")),
                "{where_}: {name} has no flag --{flag}"
            );
        }
    }
}

/// Where the Containerfile puts the binaries: the destination of its COPY of them.
fn installed_binaries() -> Vec<String> {
    let recipe = std::fs::read_to_string(deploy_dir().join("container/Containerfile")).unwrap();
    let copy = recipe
        .replace("\\\n", " ")
        .lines()
        .find(|l| l.starts_with("COPY --from=build"))
        .expect("the Containerfile copies the binaries from its build stage")
        .to_owned();
    let words: Vec<&str> = copy.split_whitespace().collect();
    let destination = words.last().unwrap().trim_end_matches('/');
    words[2..words.len() - 1]
        .iter()
        .map(|source| {
            let name = Path::new(source).file_name().unwrap().to_str().unwrap();
            format!("{destination}/{name}")
        })
        .collect()
}

#[test]
fn both_flavours_render_validate_and_reference_only_what_exists() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = with_secrets(dir.path());
    let installed = installed_binaries();
    assert_eq!(installed.len(), 3, "{installed:?}");
    for kubectl in kubectls() {
        for flavour in FLAVOURS {
            let rendered = run_ok(
                Command::new(&kubectl)
                    .arg("kustomize")
                    .arg(manifests.join(flavour)),
            );
            if flavour.ends_with("ha") {
                // etcd: TLS both ways, and only certificates its CA signed.
                for flag in [
                    "--client-cert-auth",
                    "--peer-client-cert-auth",
                    "--etcd-cert=",
                ] {
                    assert!(rendered.contains(flag), "{flavour}: no {flag}");
                }
                assert!(
                    !rendered.contains("http://0.0.0.0:23"),
                    "{flavour}: etcd in clear"
                );
            }
            let file = dir.path().join(format!("{flavour}.yaml"));
            std::fs::write(&file, &rendered).unwrap();
            let what = format!("{flavour} rendered by {}", kubectl.display());

            let validated = run_ok(
                Command::new(venv_python().with_file_name("kubernetes-validate"))
                    .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
                    .arg(&file),
            );
            let objects =
                rendered.matches("\nkind: ").count() + usize::from(rendered.starts_with("kind: "));
            assert_eq!(
                validated.matches(" passed for resource ").count(),
                objects,
                "{what}: every object must pass:\n{validated}"
            );

            let references = run_ok(
                Command::new(venv_python())
                    .arg(deploy_dir().join("tests/kubernetes_references.py"))
                    .arg(&file),
            );
            let commands: std::collections::BTreeMap<String, Vec<String>> =
                serde_json::from_str(&references).unwrap();
            let worker = commands
                .iter()
                .find(|(k, _)| k.contains("ladder-worker"))
                .unwrap_or_else(|| panic!("{what}: no worker container: {commands:?}"));
            assert!(
                worker.1.iter().any(|w| w == "--device=cuda:0"),
                "{what}: workers train on their GPU: {worker:?}"
            );
            for (where_, words) in &commands {
                check_flags(words, &installed, &format!("{what}: {where_}"));
            }
        }
    }
}
