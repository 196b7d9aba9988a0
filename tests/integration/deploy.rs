//! deploy/ is true to the binary: the systemd units, their environment file, the Kubernetes
//! manifests and the Dockerfile name only subcommands, flags and environment variables that
//! the subcommand's `--help` shows (as do the examples in `--help` itself); the manifests
//! parse and keep what the issue list found missing (probes on /healthz and /readyz on the
//! metrics port, enough memory, a locked-down securityContext); `systemd-analyze` accepts the
//! units and rates them below 3.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::spine::tidemark;
use crate::support;

/// Environment variables deploy/ sets that are not a flag's (read by tidemark directly).
const NOT_FLAGS: &[&str] = &["TIDEMARK_PG_BIN"];

/// A base backup's measured peak resident memory (bench/README.md): the sidecar's request.
const BACKUP_PEAK_MIB: u64 = 126;

/// What one `--help` offers.
#[derive(Debug, Default)]
pub struct Help {
    pub text: String,
    pub flags: BTreeSet<String>,
    pub envs: BTreeSet<String>,
}

/// `tidemark ARGS --help`, parsed.
pub fn help(args: &[&str]) -> Help {
    let mut all = args.to_vec();
    all.push("--help");
    let (code, out, err) = tidemark(&all);
    assert_eq!(code, 0, "tidemark {}: {err}", all.join(" "));
    let mut h = Help {
        text: out.clone(),
        ..Help::default()
    };
    for word in out.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == '=') {
        if let Some(flag) = word.strip_prefix("--").filter(|f| {
            !f.is_empty()
                && f.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '-' || c.is_ascii_digit())
        }) {
            h.flags.insert(flag.to_string());
        }
    }
    for piece in out.split("[env: ").skip(1) {
        let name: String = piece
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        h.envs.insert(name);
    }
    h
}

/// The binary's subcommands (from `tidemark --help`) and each one's help; "" is the top level.
pub fn commands() -> BTreeMap<String, Help> {
    let top = help(&[]);
    let section = top
        .text
        .split("Commands:")
        .nth(1)
        .expect("tidemark --help lists its commands");
    let names: Vec<String> = section
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_string)
        .collect();
    assert!(names.iter().any(|n| n == "archive"), "{}", top.text);
    let mut out: BTreeMap<String, Help> = names
        .into_iter()
        .map(|n| {
            let h = help(&[&n]);
            (n, h)
        })
        .collect();
    out.insert(String::new(), top);
    out
}

/// Words of a shell command line: double and single quotes group, `\` escapes.
pub fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quote, mut any) = (Vec::new(), String::new(), None, false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '"' | '\'') => (quote, any) = (Some(c), true),
            (Some(q), c) if c == q => quote = None,
            (None | Some('"'), '\\') => {
                if let Some(n) = chars.next() {
                    word.push(n);
                }
            }
            (None, c) if c.is_whitespace() => {
                if any || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                any = false;
            }
            (_, c) => word.push(c),
        }
    }
    if any || !word.is_empty() {
        words.push(word);
    }
    words
}

/// Where a `tidemark` command line was found, and its arguments (after the program).
#[derive(Debug)]
pub struct Invocation {
    pub place: String,
    pub args: Vec<String>,
}

/// The subcommand of an invocation ("" for the top level) and the flags it passes.
fn parts(args: &[String]) -> (String, Vec<String>) {
    let sub = args
        .iter()
        .find(|a| !a.starts_with('-'))
        .cloned()
        .unwrap_or_default();
    let flags = args
        .iter()
        .filter_map(|a| a.strip_prefix("--"))
        .map(|f| f.split('=').next().unwrap_or_default().to_string())
        .collect();
    (sub, flags)
}

/// Every problem of `invocations` against `commands`: an unknown subcommand or a flag its help
/// does not show.
pub fn check_invocations(
    commands: &BTreeMap<String, Help>,
    invocations: &[Invocation],
) -> Vec<String> {
    let mut problems = Vec::new();
    for inv in invocations {
        let (sub, flags) = parts(&inv.args);
        let Some(help) = commands.get(&sub) else {
            problems.push(format!(
                "{}: no subcommand `{sub}` in tidemark --help",
                inv.place
            ));
            continue;
        };
        for f in flags {
            if !help.flags.contains(&f) {
                problems.push(format!(
                    "{}: `tidemark {sub}` has no flag --{f} in its --help",
                    inv.place
                ));
            }
        }
    }
    problems
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file under deploy/, and the Dockerfile.
fn deploy_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = vec![root().join("Dockerfile")];
    walk(&root().join("deploy"), &mut out);
    out.sort();
    out
}

fn name(p: &Path) -> String {
    p.strip_prefix(root()).unwrap().display().to_string()
}

fn yaml_documents(p: &Path) -> Vec<serde_yaml::Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(p).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde_yaml::Value::deserialize(d)
                .unwrap_or_else(|e| panic!("{} does not parse as YAML: {e}", name(p)))
        })
        .collect()
}

/// The containers (mappings with an `image`) of a manifest whose image is tidemark's.
fn tidemark_containers(v: &serde_yaml::Value, out: &mut Vec<serde_yaml::Value>) {
    match v {
        serde_yaml::Value::Mapping(m) => {
            if m.get("image")
                .and_then(|i| i.as_str())
                .is_some_and(|i| i.contains("tidemark"))
            {
                out.push(v.clone());
            }
            m.values().for_each(|v| tidemark_containers(v, out));
        }
        serde_yaml::Value::Sequence(s) => s.iter().for_each(|v| tidemark_containers(v, out)),
        _ => {}
    }
}

fn strings(v: Option<&serde_yaml::Value>) -> Vec<String> {
    v.and_then(|v| v.as_sequence())
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The `tidemark` command lines in one deploy file.
fn invocations(p: &Path) -> Vec<Invocation> {
    let text = std::fs::read_to_string(p).unwrap();
    let file = name(p);
    let mut out = Vec::new();
    let file_name = p.file_name().unwrap().to_str().unwrap();
    if file_name.ends_with(".service") {
        for (i, line) in text.lines().enumerate() {
            if let Some(cmd) = line.strip_prefix("ExecStart=") {
                let words = shell_words(cmd);
                let at = words
                    .iter()
                    .position(|w| w.ends_with("/tidemark"))
                    .unwrap_or_else(|| panic!("{file}:{}: ExecStart runs no tidemark", i + 1));
                out.push(Invocation {
                    place: format!("{file}:{}", i + 1),
                    args: words[at + 1..].to_vec(),
                });
            }
        }
    } else if file_name == "Dockerfile" {
        for (i, line) in text.lines().enumerate() {
            let place = format!("{file}:{}", i + 1);
            if let Some(json) = line.strip_prefix("ENTRYPOINT ") {
                let v: Vec<String> = serde_json::from_str(json).unwrap();
                assert_eq!(v, ["/usr/local/bin/tidemark"], "{place}");
            } else if let Some(json) = line.strip_prefix("CMD ") {
                let args: Vec<String> = serde_json::from_str(json).unwrap();
                out.push(Invocation { place, args });
            }
        }
    } else if file.starts_with("deploy/kubernetes") {
        for doc in yaml_documents(p) {
            let mut containers = Vec::new();
            tidemark_containers(&doc, &mut containers);
            for c in containers {
                let mut args = strings(c.get("command"));
                if !args.is_empty() {
                    args.remove(0);
                }
                args.extend(strings(c.get("args")));
                out.push(Invocation {
                    place: format!("{file}: container {:?}", c.get("name")),
                    args,
                });
            }
        }
    }
    out
}

/// `TIDEMARK_…` names in a text (comments included: they are instructions too).
fn env_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .filter(|w| w.starts_with("TIDEMARK_") && w.len() > "TIDEMARK_".len())
        .map(str::to_string)
        .collect()
}

#[test]
fn deploy_names_only_what_the_binary_has() {
    let commands = commands();
    let files = deploy_files();
    let mut problems = Vec::new();
    let mut all_invocations = Vec::new();
    // Subcommands each folder runs: a file without a command line of its own (the
    // environment file) is read by its folder's units.
    let mut by_folder: BTreeMap<PathBuf, BTreeSet<String>> = BTreeMap::new();
    let mut per_file = Vec::new();
    for p in &files {
        let name = p.file_name().unwrap().to_str().unwrap();
        if name.ends_with(".yaml") || name.ends_with(".yml") {
            assert!(!yaml_documents(p).is_empty(), "{} is empty", self::name(p));
        }
        if name.ends_with(".json") {
            let text = std::fs::read_to_string(p).unwrap();
            serde_json::from_str::<serde_json::Value>(&text)
                .unwrap_or_else(|e| panic!("{} does not parse as JSON: {e}", self::name(p)));
        }
        let inv = invocations(p);
        let subs: BTreeSet<String> = inv.iter().map(|i| parts(&i.args).0).collect();
        by_folder
            .entry(p.parent().unwrap().to_path_buf())
            .or_default()
            .extend(subs.iter().cloned());
        per_file.push((p.clone(), subs));
        all_invocations.extend(inv);
    }
    assert!(
        all_invocations.len() >= 4,
        "expected the units, the manifest and the Dockerfile to run tidemark: {all_invocations:?}"
    );
    problems.extend(check_invocations(&commands, &all_invocations));

    let every_env: BTreeSet<&String> = commands.values().flat_map(|h| &h.envs).collect();
    for (p, subs) in per_file {
        let mut subs = if subs.is_empty() {
            by_folder
                .get(p.parent().unwrap())
                .cloned()
                .unwrap_or_default()
        } else {
            subs
        };
        subs.remove("");
        // A file that runs no particular command (the Dockerfile's `--help`, the alert rules)
        // may name any command's variable, and so may one running a pending command.
        let known: BTreeSet<&String> =
            if subs.is_empty() || subs.iter().any(|s| !commands.contains_key(s)) {
                every_env.clone()
            } else {
                subs.iter()
                    .filter_map(|s| commands.get(s))
                    .chain(commands.get(""))
                    .flat_map(|h| &h.envs)
                    .collect()
            };
        let text = std::fs::read_to_string(&p).unwrap();
        for env in env_names(&text) {
            if !known.contains(&env) && !NOT_FLAGS.contains(&env.as_str()) {
                problems.push(format!(
                    "{}: {env} is no environment variable of `tidemark {}` (--help)",
                    name(&p),
                    subs.iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("`, `tidemark ")
                ));
            }
        }
    }
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for env in NOT_FLAGS {
        assert!(readme.contains(env), "README.md does not document {env}");
    }
    assert!(
        problems.is_empty(),
        "deploy/ is not true to the binary:\n{}",
        problems.join("\n")
    );
}

#[test]
fn help_examples_name_only_flags_the_command_has() {
    let commands = commands();
    let mut invocations = Vec::new();
    for (sub, h) in &commands {
        let Some(examples) = h.text.split("Examples:").nth(1) else {
            continue;
        };
        let joined = examples.replace("\\\n", " ");
        for line in joined
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("tidemark "))
        {
            let words = shell_words(line);
            invocations.push(Invocation {
                place: format!("tidemark {sub} --help: {line}"),
                args: words[1..].to_vec(),
            });
            assert_eq!(
                parts(&words[1..]).0,
                *sub,
                "an example of another command: {line}"
            );
        }
    }
    for main in [
        "setup",
        "archive",
        "backup",
        "list",
        "restore",
        "prune",
        "completions",
    ] {
        assert!(
            invocations.iter().any(|i| parts(&i.args).0 == main),
            "tidemark {main} --help shows no example"
        );
    }
    let problems = check_invocations(&commands, &invocations);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Mebibytes of a Kubernetes quantity such as `160Mi` or `1Gi`.
fn mebibytes(q: &str) -> u64 {
    let (n, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("quantity {q}"));
    match unit {
        "Mi" => n,
        "Gi" => n * 1024,
        "M" => n * 1_000_000 / (1 << 20),
        "G" => n * 1_000_000_000 / (1 << 20),
        other => panic!("unexpected unit {other} in {q}"),
    }
}

#[test]
fn the_kubernetes_sidecar_is_probed_limited_and_locked_down() {
    let p = root().join("deploy/kubernetes/sidecar.yaml");
    let mut containers = Vec::new();
    for doc in yaml_documents(&p) {
        tidemark_containers(&doc, &mut containers);
    }
    assert_eq!(containers.len(), 1, "one tidemark sidecar");
    let c = &containers[0];
    let image = c["image"].as_str().unwrap();
    assert!(
        !image.ends_with(":latest") && image != "tidemark",
        "{image}: name a built image"
    );
    let env: BTreeMap<&str, &str> = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e.get("value")?.as_str()?)))
        .collect();
    let address = env["TIDEMARK_METRICS_ADDRESS"];
    let port: u64 = address.rsplit(':').next().unwrap().parse().unwrap();
    assert_ne!(port, 9187, "9187 is postgres_exporter's port");
    let ports = c["ports"].as_sequence().unwrap();
    let port_name = ports
        .iter()
        .find(|p| p["containerPort"].as_u64() == Some(port))
        .unwrap_or_else(|| panic!("no containerPort {port} (the metrics address {address})"))
        ["name"]
        .as_str()
        .unwrap();
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert!(
            get["port"].as_str() == Some(port_name) || get["port"].as_u64() == Some(port),
            "{probe} is not on the metrics port"
        );
    }
    assert!(
        env.contains_key("TIDEMARK_SOURCE_WAIT"),
        "the archiver must wait for PostgreSQL starting beside it"
    );
    let resources = &c["resources"];
    let request = mebibytes(resources["requests"]["memory"].as_str().unwrap());
    let limit = mebibytes(resources["limits"]["memory"].as_str().unwrap());
    assert!(
        request >= BACKUP_PEAK_MIB,
        "memory request {request}Mi < the measured peak"
    );
    assert!(limit >= request, "memory limit {limit}Mi below the request");
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(strings(sc["capabilities"].get("drop")), ["ALL"]);
    // The read-only root leaves a writable /tmp for spooling.
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert!(mounts.contains(&"/tmp"), "{mounts:?}");
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

#[test]
fn systemd_units_pass_systemd_analyze_verify_and_security() {
    let Some(analyze) = on_path("systemd-analyze") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have systemd-analyze (Debian package systemd; .ci/run installs it)"
        );
        eprintln!("systemd-analyze is not installed: the units are not checked");
        return;
    };
    // The units run the binary under test (verify checks that ExecStart is executable), and
    // each template also as an instance.
    let dir = tempfile::tempdir().unwrap();
    let bin = support::tidemark_bin();
    let mut units = Vec::new();
    for e in std::fs::read_dir(root().join("deploy/systemd"))
        .unwrap()
        .flatten()
    {
        let file = e.file_name().into_string().unwrap();
        if !(file.ends_with(".service") || file.ends_with(".timer")) {
            continue;
        }
        let text = std::fs::read_to_string(e.path())
            .unwrap()
            .replace("/usr/local/bin/tidemark", bin.to_str().unwrap());
        let mut names = vec![file.clone()];
        if file.contains("@.") {
            names.push(file.replace("@.", "@app."));
        }
        for n in names {
            std::fs::write(dir.path().join(&n), &text).unwrap();
            units.push(n);
        }
    }
    units.sort();
    for expected in [
        "tidemark.service",
        "tidemark@.service",
        "tidemark-verify@.service",
        "tidemark-verify@.timer",
    ] {
        assert!(
            units.iter().any(|u| u == expected),
            "deploy/systemd has no {expected}"
        );
    }
    let out = Command::new(&analyze)
        .arg("verify")
        .args(units.iter().map(|u| dir.path().join(u)))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify {units:?}:\n{err}"
    );
    // `--offline` rates a unit file without a running systemd (systemd 250 and later).
    let version = Command::new(&analyze).arg("--version").output().unwrap();
    let version: u32 = String::from_utf8_lossy(&version.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if version < 250 {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd {version} has no security --offline"
        );
        eprintln!("systemd {version} cannot rate unit files offline: security not checked");
        return;
    }
    for unit in units
        .iter()
        .filter(|u| u.ends_with(".service") && !u.contains("@."))
    {
        let out = Command::new(&analyze)
            .args(["security", "--offline=yes", "--threshold=29"])
            .arg(dir.path().join(unit))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let verdict = text.lines().last().unwrap_or_default();
        assert!(
            out.status.success(),
            "{unit} is rated above 2.9: {verdict}\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{unit}: {verdict}");
    }
}

#[test]
fn shell_words_split_as_a_shell_does() {
    assert_eq!(
        shell_words(r#"tidemark archive --source "host=db dbname=app" --repo 'a b' x\ y"#),
        [
            "tidemark",
            "archive",
            "--source",
            "host=db dbname=app",
            "--repo",
            "a b",
            "x y"
        ]
    );
    assert_eq!(shell_words(r#"--tag """#), ["--tag", ""]);
}
