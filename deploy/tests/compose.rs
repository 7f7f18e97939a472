//! Deployment checks with no Docker engine: parses docker-compose.yml, the Dockerfile,
//! .dockerignore, nats.conf and the workspace (manifests and Rust source) and checks that they
//! agree — each service runs a binary the workspace builds and the image contains, its environment
//! holds only variables that binary's source reads, its NATS user is its own, it waits for a healthy
//! NATS, restarts on failure and keeps its data on its own volume.
//!
//! The environment variables a binary reads are derived from its source, not listed here: the
//! files of its module tree, plus the modules of its package's library and of its path
//! dependencies' libraries that those files name (see `binary_files`), with comments and
//! `#[cfg(test)]` items removed, are searched for clap `env = "NAME"` attributes,
//! `env::var("NAME")` / `env::var_os("NAME")` calls, `EnvFilter::from_default_env` (RUST_LOG),
//! and, in a file that calls `env::var`, every string literal shaped like a variable name
//! (`JETSAGA_FAULT_DELAY_MS`, read through a lookup closure). Run with `--nocapture` to see the
//! derived sets.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use regex::Regex;
use yaml_rust2::{Yaml, YamlLoader};

// ---- the contract ----------------------------------------------------------------------------------

/// The binaries the image ships, by package.
const BINARIES: &[(&str, &str)] = &[
    ("jetsaga-orchestrator", "jetsaga-orchestrator"),
    ("jetsaga", "jetsaga-orchestrator"),
    ("jetsaga-order", "jetsaga-participants"),
    ("jetsaga-payment", "jetsaga-participants"),
    ("jetsaga-inventory", "jetsaga-participants"),
];

/// The long-running processes: service name, binary, NATS user.
const PROCESSES: &[(&str, &str, &str)] = &[
    ("orchestrator", "jetsaga-orchestrator", "orchestrator"),
    ("order", "jetsaga-order", "order"),
    ("payment", "jetsaga-payment", "payment"),
    ("inventory", "jetsaga-inventory", "inventory"),
];

/// The tools (profile `tools`): service name, NATS user.
const TOOLS: &[(&str, &str)] = &[
    ("nats-box", "admin"),
    ("client", "client"),
    ("cli", "admin"),
];

/// The NATS users of account JETSAGA; nats.conf reads user `u`'s password from
/// `JETSAGA_<U>_PASSWORD`.
const NATS_USERS: &[&str] = &[
    "orchestrator",
    "order",
    "payment",
    "inventory",
    "admin",
    "client",
];

/// What the nats CLI in nats-box reads (documented, container-only).
const NATS_CLI_ENV: &[&str] = &["NATS_URL", "NATS_USER", "NATS_PASSWORD"];

const NATS_URL: &str = "nats://nats:4222";
const TOOLS_PROFILE: &str = "tools";

fn password_var(user: &str) -> String {
    format!("JETSAGA_{}_PASSWORD", user.to_uppercase())
}

/// What compose passes as the password of `user`: the `.env`/environment variable with a
/// development default.
fn password_value(user: &str) -> String {
    format!("${{{}:-dev-{user}}}", password_var(user))
}

// ---- files -----------------------------------------------------------------------------------------

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("deploy/ is inside the workspace")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("valid regex")
}

// ---- the workspace ---------------------------------------------------------------------------------

#[derive(Debug)]
struct Package {
    name: String,
    dir: PathBuf,
    lib: Option<PathBuf>,
    bins: BTreeMap<String, PathBuf>,
    /// Directories of path dependencies (normal dependencies only).
    path_deps: Vec<PathBuf>,
}

fn load_toml(path: &Path) -> toml::Table {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("{} is not valid TOML: {e}", path.display()))
}

fn load_package(dir: &Path) -> Package {
    let manifest = load_toml(&dir.join("Cargo.toml"));
    let pkg = manifest["package"].as_table().expect("[package]");
    let name = pkg["name"].as_str().expect("package.name").to_string();
    let autobins = pkg
        .get("autobins")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let mut bins = BTreeMap::new();
    if let Some(list) = manifest.get("bin").and_then(|b| b.as_array()) {
        for b in list {
            let bin_name = b["name"].as_str().expect("[[bin]] name").to_string();
            let path = match b.get("path").and_then(|p| p.as_str()) {
                Some(p) => dir.join(p),
                None if bin_name == name => dir.join("src/main.rs"),
                None => dir.join(format!("src/bin/{bin_name}.rs")),
            };
            bins.insert(bin_name, path);
        }
    }
    if autobins {
        let main = dir.join("src/main.rs");
        if main.is_file() && !bins.values().any(|p| p == &main) {
            bins.entry(name.clone()).or_insert(main);
        }
        if let Ok(entries) = fs::read_dir(dir.join("src/bin")) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "rs") && !bins.values().any(|b| b == &p) {
                    let stem = p.file_stem().unwrap().to_string_lossy().to_string();
                    bins.entry(stem).or_insert(p);
                }
            }
        }
    }
    let lib = match manifest.get("lib").and_then(|l| l.get("path")) {
        Some(p) => Some(dir.join(p.as_str().expect("lib.path"))),
        None => Some(dir.join("src/lib.rs")).filter(|p| p.is_file()),
    };
    let path_deps = manifest
        .get("dependencies")
        .and_then(|d| d.as_table())
        .map(|deps| {
            deps.values()
                .filter_map(|d| d.get("path").and_then(|p| p.as_str()))
                .map(|p| dir.join(p))
                .collect()
        })
        .unwrap_or_default();
    Package {
        name,
        dir: dir.to_path_buf(),
        lib,
        bins,
        path_deps,
    }
}

fn workspace() -> &'static Vec<Package> {
    static WS: OnceLock<Vec<Package>> = OnceLock::new();
    WS.get_or_init(|| {
        let manifest = load_toml(&root().join("Cargo.toml"));
        manifest["workspace"]["members"]
            .as_array()
            .expect("workspace.members")
            .iter()
            .map(|m| load_package(&root().join(m.as_str().expect("member path"))))
            .collect()
    })
}

/// Binary name → its package, for every binary the workspace builds.
fn workspace_bins() -> BTreeMap<String, &'static Package> {
    let mut out = BTreeMap::new();
    for p in workspace() {
        for b in p.bins.keys() {
            assert!(
                out.insert(b.clone(), p).is_none(),
                "binary {b} is defined twice in the workspace"
            );
        }
    }
    out
}

// ---- Rust source: what a binary reads from the environment ------------------------------------

/// `src` with comments blanked and every `#[cfg(test)]` item (a test module, a test-only `use`,
/// `mod x;` or function) removed; string and char literals are kept. Newlines are kept so the
/// text stays aligned with the source.
fn strip_comments_and_tests(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out: Vec<char> = Vec::with_capacity(c.len());
    // Whether each output char is inside a string or char literal (for brace matching below).
    let mut lit: Vec<bool> = Vec::with_capacity(c.len());
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    let push = |out: &mut Vec<char>, lit: &mut Vec<bool>, ch: char, in_lit: bool| {
        out.push(ch);
        lit.push(in_lit);
    };
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        if ch == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                push(&mut out, &mut lit, ' ', false);
                i += 1;
            }
        } else if ch == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    push(&mut out, &mut lit, ' ', false);
                    push(&mut out, &mut lit, ' ', false);
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    push(&mut out, &mut lit, ' ', false);
                    push(&mut out, &mut lit, ' ', false);
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    let keep = if c[i] == '\n' { '\n' } else { ' ' };
                    push(&mut out, &mut lit, keep, false);
                    i += 1;
                }
            }
        } else if ch == 'r'
            && (i == 0 || !ident(c[i - 1]) || (c[i - 1] == 'b' && (i < 2 || !ident(c[i - 2]))))
            && matches!(next, Some('"') | Some('#'))
        {
            // Raw string r"..." / r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                push(&mut out, &mut lit, ch, false);
                i += 1;
                continue;
            }
            for &x in &c[i..=j] {
                push(&mut out, &mut lit, x, true);
            }
            i = j + 1;
            while i < c.len() {
                if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
                    for &x in &c[i..=i + hashes] {
                        push(&mut out, &mut lit, x, true);
                    }
                    i += hashes + 1;
                    break;
                }
                push(&mut out, &mut lit, c[i], true);
                i += 1;
            }
        } else if ch == '"' {
            push(&mut out, &mut lit, ch, true);
            i += 1;
            while i < c.len() {
                if c[i] == '\\' {
                    push(&mut out, &mut lit, c[i], true);
                    if let Some(&e) = c.get(i + 1) {
                        push(&mut out, &mut lit, e, true);
                    }
                    i += 2;
                    continue;
                }
                push(&mut out, &mut lit, c[i], true);
                i += 1;
                if c[i - 1] == '"' {
                    break;
                }
            }
        } else if ch == '\'' && (next == Some('\\') || c.get(i + 2) == Some(&'\'')) {
            // A char literal ('x', '\n', '\''); anything else is a lifetime or a label.
            push(&mut out, &mut lit, ch, true);
            i += 1;
            while i < c.len() {
                if c[i] == '\\' {
                    push(&mut out, &mut lit, c[i], true);
                    if let Some(&e) = c.get(i + 1) {
                        push(&mut out, &mut lit, e, true);
                    }
                    i += 2;
                    continue;
                }
                push(&mut out, &mut lit, c[i], true);
                i += 1;
                if c[i - 1] == '\'' {
                    break;
                }
            }
        } else {
            push(&mut out, &mut lit, ch, false);
            i += 1;
        }
    }

    // Remove `#[cfg(test)]` items: from the attribute to the end of the item (`;` or the brace
    // that closes its body, counted outside literals).
    let text: String = out.iter().collect();
    let attr = re(r"#\[cfg\(test\)\]");
    let mut blank = vec![false; out.len()];
    let char_index: Vec<usize> = text.char_indices().map(|(b, _)| b).collect();
    for m in attr.find_iter(&text) {
        let start = char_index.partition_point(|&b| b < m.start());
        if lit[start] || blank[start] {
            continue;
        }
        let mut j = char_index.partition_point(|&b| b < m.end());
        let mut depth = 0usize;
        while j < out.len() {
            if !lit[j] {
                match out[j] {
                    '{' => depth += 1,
                    // A `}` at depth 0 closes the enclosing block: the item ended before it.
                    '}' if depth == 0 => break,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ';' if depth == 0 => break,
                    _ => {}
                }
            }
            j += 1;
        }
        for b in blank.iter_mut().take((j + 1).min(out.len())).skip(start) {
            *b = true;
        }
    }
    out.iter()
        .zip(&blank)
        .map(|(&ch, &b)| if b && ch != '\n' { ' ' } else { ch })
        .collect()
}

/// The files of the module tree rooted at `root_file` (a crate root), without test-only modules.
fn module_files(root_file: &Path) -> Vec<PathBuf> {
    let decl = re(r"(?m)^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+([A-Za-z_][A-Za-z0-9_]*)\s*;");
    let mut files = Vec::new();
    let mut todo = vec![(root_file.to_path_buf(), true)];
    while let Some((file, is_root)) = todo.pop() {
        let src = strip_comments_and_tests(
            &fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display())),
        );
        let stem = file.file_stem().unwrap().to_string_lossy().to_string();
        let dir = if is_root || stem == "mod" {
            file.parent().unwrap().to_path_buf()
        } else {
            file.parent().unwrap().join(&stem)
        };
        for cap in decl.captures_iter(&src) {
            let name = &cap[1];
            let flat = dir.join(format!("{name}.rs"));
            let nested = dir.join(name).join("mod.rs");
            let child = if flat.is_file() {
                flat
            } else if nested.is_file() {
                nested
            } else {
                panic!("{}: `mod {name};` has no file", file.display())
            };
            todo.push((child, false));
        }
        files.push(file);
    }
    files
}

/// Environment variables read by the code in `src` (already stripped).
fn env_reads(src: &str) -> BTreeSet<String> {
    static PATTERNS: OnceLock<[Regex; 3]> = OnceLock::new();
    let [clap_env, env_var, shaped] = PATTERNS.get_or_init(|| {
        [
            re(r#"\benv\s*=\s*"([A-Za-z_][A-Za-z0-9_]*)""#),
            re(r#"\benv::var(?:_os)?\(\s*"([A-Za-z_][A-Za-z0-9_]*)"\s*\)"#),
            re(r#""([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)""#),
        ]
    });
    let mut names: BTreeSet<String> = clap_env
        .captures_iter(src)
        .chain(env_var.captures_iter(src))
        .map(|c| c[1].to_string())
        .collect();
    if src.contains("from_default_env") {
        // tracing_subscriber::EnvFilter::{try_,}from_default_env reads RUST_LOG.
        names.insert("RUST_LOG".into());
    }
    if src.contains("env::var") {
        names.extend(shaped.captures_iter(src).map(|c| c[1].to_string()));
    }
    names
}

/// The Rust files whose code binary `bin` can run: its own module tree, and every module of its
/// package's library and (transitively) of its path dependencies' libraries that some counted file
/// names (`telemetry::init`, `use jetsaga_common::{nats, topology}`); the library crate roots
/// always count. So the `jetsaga` CLI, which never calls `telemetry::init`, does not read
/// `RUST_LOG`. Over-counting (a module name used as an ordinary word) only allows more.
fn binary_files(bin: &str) -> Vec<PathBuf> {
    let bins = workspace_bins();
    let pkg = bins
        .get(bin)
        .unwrap_or_else(|| panic!("no binary {bin} in the workspace"));
    let mut counted: BTreeSet<PathBuf> = module_files(&pkg.bins[bin]).into_iter().collect();
    let mut candidates = Vec::new();
    let mut seen = BTreeSet::new();
    let mut todo = vec![pkg.dir.clone()];
    while let Some(dir) = todo.pop() {
        let dir = dir.canonicalize().expect("package dir");
        if !seen.insert(dir.clone()) {
            continue;
        }
        let p = load_package(&dir);
        if let Some(lib) = &p.lib {
            let mut files = module_files(lib);
            let lib_root = files.remove(files.iter().position(|f| f == lib).unwrap());
            counted.insert(lib_root);
            candidates.extend(files);
        }
        todo.extend(p.path_deps);
    }
    let decl = re(r"(?m)^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+[A-Za-z_][A-Za-z0-9_]*\s*;");
    let mut queue: Vec<PathBuf> = counted.iter().cloned().collect();
    while let Some(file) = queue.pop() {
        let code = strip_comments_and_tests(&fs::read_to_string(&file).unwrap());
        let code = decl.replace_all(&code, "");
        candidates.retain(|c| {
            let stem = c.file_stem().unwrap().to_string_lossy().to_string();
            let name = if stem == "mod" {
                c.parent()
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .to_string()
            } else {
                stem
            };
            if re(&format!(r"\b{name}\b")).is_match(&code) {
                if counted.insert(c.clone()) {
                    queue.push(c.clone());
                }
                false
            } else {
                true
            }
        });
    }
    counted.into_iter().collect()
}

/// The environment variables binary `bin` reads, derived from its source.
fn env_read_by(bin: &str) -> BTreeSet<String> {
    static CACHE: OnceLock<std::sync::Mutex<BTreeMap<String, BTreeSet<String>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(v) = cache.lock().unwrap().get(bin) {
        return v.clone();
    }
    let names: BTreeSet<String> = binary_files(bin)
        .iter()
        .flat_map(|f| env_reads(&strip_comments_and_tests(&fs::read_to_string(f).unwrap())))
        .collect();
    cache.lock().unwrap().insert(bin.into(), names.clone());
    names
}

// ---- docker-compose.yml ----------------------------------------------------------------------------

fn compose() -> &'static Yaml {
    static DOC: OnceLock<Yaml> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut docs = YamlLoader::load_from_str(&read("docker-compose.yml"))
            .expect("docker-compose.yml is valid YAML");
        assert_eq!(docs.len(), 1, "docker-compose.yml holds one document");
        docs.remove(0)
    })
}

fn services() -> Vec<(String, &'static Yaml)> {
    compose()["services"]
        .as_hash()
        .expect("docker-compose.yml has services")
        .iter()
        .map(|(k, v)| (k.as_str().expect("service name").to_string(), v))
        .collect()
}

fn service(name: &str) -> &'static Yaml {
    let s = &compose()["services"][name];
    assert!(!s.is_badvalue(), "docker-compose.yml has no service {name}");
    s
}

fn scalar(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn str_list(y: &Yaml, what: &str) -> Vec<String> {
    match y {
        Yaml::Array(a) => a
            .iter()
            .map(|v| scalar(v).unwrap_or_else(|| panic!("{what}: not a scalar: {v:?}")))
            .collect(),
        Yaml::BadValue => Vec::new(),
        other => panic!("{what}: expected a list, got {other:?}"),
    }
}

/// A service's environment, in map or `KEY=value` list form.
fn env_of(svc: &Yaml) -> BTreeMap<String, String> {
    match &svc["environment"] {
        Yaml::Hash(h) => h
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().expect("variable name").to_string(),
                    scalar(v).unwrap_or_default(),
                )
            })
            .collect(),
        Yaml::Array(a) => a
            .iter()
            .map(|v| {
                let s = v.as_str().expect("KEY=value");
                let (k, v) = s.split_once('=').unwrap_or((s, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        Yaml::BadValue => BTreeMap::new(),
        other => panic!("environment: unexpected {other:?}"),
    }
}

/// The exec-form command of a service.
fn command_of(name: &str) -> Vec<String> {
    let cmd = &service(name)["command"];
    assert!(
        matches!(cmd, Yaml::Array(_)),
        "service {name}: `command` must be an exec-form list, got {cmd:?}"
    );
    str_list(cmd, &format!("{name}.command"))
}

fn image_of(name: &str) -> String {
    service(name)["image"]
        .as_str()
        .unwrap_or_else(|| panic!("service {name} has no image"))
        .to_string()
}

/// Services built from the repo's Dockerfile.
fn jetsaga_services() -> Vec<String> {
    services()
        .into_iter()
        .filter(|(_, s)| !s["build"].is_badvalue())
        .map(|(n, _)| n)
        .collect()
}

fn is_nats_box(name: &str) -> bool {
    image_of(name).starts_with("natsio/nats-box:")
}

/// `(source, target)` of a service's short-syntax volumes.
fn volumes_of(name: &str) -> Vec<(String, String)> {
    str_list(&service(name)["volumes"], &format!("{name}.volumes"))
        .into_iter()
        .map(|v| {
            let mut parts = v.splitn(3, ':');
            let src = parts.next().unwrap().to_string();
            let dst = parts
                .next()
                .unwrap_or_else(|| panic!("{name}: volume {v:?} has no target"))
                .to_string();
            (src, dst)
        })
        .collect()
}

fn declared_volumes() -> BTreeSet<String> {
    compose()["volumes"]
        .as_hash()
        .map(|h| {
            h.keys()
                .map(|k| k.as_str().expect("volume name").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// `(host ip, host port, container port)` of a service's short-syntax ports.
fn ports_of(name: &str) -> Vec<(String, u16, u16)> {
    str_list(&service(name)["ports"], &format!("{name}.ports"))
        .into_iter()
        .map(|p| {
            let parts: Vec<&str> = p.split(':').collect();
            let port = |s: &str| {
                s.parse::<u16>()
                    .unwrap_or_else(|_| panic!("{name}: bad port in {p:?}"))
            };
            match parts.as_slice() {
                [ip, host, container] => (ip.to_string(), port(host), port(container)),
                _ => panic!("{name}: publish ports as IP:HOST:CONTAINER (got {p:?})"),
            }
        })
        .collect()
}

fn healthcheck_text(name: &str) -> String {
    let test = str_list(
        &service(name)["healthcheck"]["test"],
        &format!("{name}.healthcheck.test"),
    );
    assert!(
        matches!(
            test.first().map(String::as_str),
            Some("CMD") | Some("CMD-SHELL")
        ),
        "service {name}: healthcheck.test must start with CMD or CMD-SHELL: {test:?}"
    );
    test.join(" ")
}

/// The value following `flag` in `cmd`.
fn flag_value<'a>(cmd: &'a [String], flags: &[&str]) -> Option<&'a str> {
    cmd.iter()
        .position(|a| flags.contains(&a.as_str()))
        .and_then(|i| cmd.get(i + 1))
        .map(String::as_str)
}

// ---- nats.conf -------------------------------------------------------------------------------------

/// nats.conf text without `#` and `//` comments.
fn nats_conf_text(text: &str) -> String {
    let comment = re(r"(?m)(^|\s)(#|//).*$");
    comment.replace_all(text, "$1").into_owned()
}

fn nats_conf() -> String {
    nats_conf_text(&read("nats.conf"))
}

/// Users defined in a nats configuration (`user: name` entries, quoted or not), in order.
fn conf_users(conf: &str) -> Vec<String> {
    re(r#"\buser\s*[:=]\s*["']?([A-Za-z0-9_.@-]+)["']?"#)
        .captures_iter(conf)
        .map(|c| c[1].to_string())
        .collect()
}

fn nats_conf_users() -> BTreeSet<String> {
    conf_users(&nats_conf()).into_iter().collect()
}

/// Environment variables a nats configuration references, in order. A reference is a whole
/// value (`password: $NAME`), not a `$` inside a bcrypt hash.
/// Variable references of a nats-server config: unquoted `$NAME` values (a quoted "$JS.API.>"
/// is a literal subject, not a variable); comment lines are skipped.
fn conf_variables(conf: &str) -> Vec<String> {
    let var = re(r#"(?:^|[\s:=\[,])\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?(?:[\s,\]}]|$)"#);
    conf.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| {
            var.captures_iter(l)
                .map(|c| c[1].to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn nats_conf_variables() -> BTreeSet<String> {
    conf_variables(&nats_conf()).into_iter().collect()
}

/// The monitoring port nats.conf sets (`http: host:port`, `http: port` or `http_port: port`).
fn nats_conf_monitor_port(conf: &str) -> Option<u16> {
    re(r#"(?m)^\s*(?:http\s*[:=]\s*"?(?:[^\s":]+:)?|http_port\s*[:=]\s*)(\d+)"#)
        .captures(conf)
        .map(|c| c[1].parse().unwrap())
}

fn nats_conf_listen_host(conf: &str) -> Option<String> {
    re(r#"(?m)^\s*listen\s*[:=]\s*"?([^\s":]+):\d+"#)
        .captures(conf)
        .map(|c| c[1].to_string())
}

fn nats_conf_http_host(conf: &str) -> Option<String> {
    re(r#"(?m)^\s*http\s*[:=]\s*"?([^\s":]+):\d+"#)
        .captures(conf)
        .map(|c| c[1].to_string())
}

// ---- Dockerfile ------------------------------------------------------------------------------------

#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
}

#[derive(Debug)]
struct Stage {
    image: String,
    name: Option<String>,
    instructions: Vec<Instruction>,
}

/// The Dockerfile's stages, with continuation lines joined and comments dropped.
fn dockerfile() -> &'static Vec<Stage> {
    static STAGES: OnceLock<Vec<Stage>> = OnceLock::new();
    STAGES.get_or_init(|| {
        let mut logical = Vec::new();
        let mut current = String::new();
        for line in read("Dockerfile").lines() {
            let t = line.trim();
            if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
                continue;
            }
            match t.strip_suffix('\\') {
                Some(head) => {
                    current.push_str(head);
                    current.push(' ');
                }
                None => {
                    current.push_str(t);
                    logical.push(std::mem::take(&mut current));
                }
            }
        }
        let mut stages: Vec<Stage> = Vec::new();
        for l in logical {
            let (kw, args) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
            let (kw, args) = (kw.to_uppercase(), args.trim().to_string());
            if kw == "FROM" {
                let words: Vec<&str> = args.split_whitespace().collect();
                let name = match words.as_slice() {
                    [_, as_, n] if as_.eq_ignore_ascii_case("as") => Some(n.to_string()),
                    [_] => None,
                    _ => panic!("Dockerfile: unexpected FROM {args}"),
                };
                stages.push(Stage {
                    image: words[0].to_string(),
                    name,
                    instructions: Vec::new(),
                });
            } else {
                stages
                    .last_mut()
                    .expect("Dockerfile: instruction before FROM")
                    .instructions
                    .push(Instruction { keyword: kw, args });
            }
        }
        stages
    })
}

fn final_stage() -> &'static Stage {
    dockerfile().last().expect("Dockerfile has a stage")
}

/// The `--bin` names of the `cargo build` in the Dockerfile (exactly one such RUN).
fn dockerfile_built_bins() -> (BTreeSet<String>, String) {
    let builds: Vec<&Instruction> = dockerfile()
        .iter()
        .flat_map(|s| &s.instructions)
        .filter(|i| i.keyword == "RUN" && i.args.contains("cargo build"))
        .collect();
    assert_eq!(
        builds.len(),
        1,
        "the Dockerfile runs `cargo build` exactly once"
    );
    let args = builds[0].args.clone();
    let bins = re(r"--bin[ =]([A-Za-z0-9_-]+)")
        .captures_iter(&args)
        .map(|c| c[1].to_string())
        .collect();
    (bins, args)
}

/// Binaries the final stage copies from the build stage's target/release.
fn dockerfile_copied_bins() -> BTreeSet<String> {
    let release = re(r"/target/release/([A-Za-z0-9_-]+)$");
    final_stage()
        .instructions
        .iter()
        .filter(|i| i.keyword == "COPY" && i.args.starts_with("--from="))
        .flat_map(|i| {
            let words: Vec<&str> = i.args.split_whitespace().skip(1).collect();
            let (_dest, srcs) = words.split_last().expect("COPY has a destination");
            srcs.iter()
                .map(|s| {
                    release
                        .captures(s)
                        .unwrap_or_else(|| panic!("COPY --from of something else: {s}"))[1]
                        .to_string()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `(repo source, image destination)` of the final stage's COPYs from the build context.
fn dockerfile_context_copies() -> Vec<(String, String)> {
    final_stage()
        .instructions
        .iter()
        .filter(|i| i.keyword == "COPY" && !i.args.starts_with("--"))
        .map(|i| {
            let words: Vec<&str> = i.args.split_whitespace().collect();
            assert_eq!(words.len(), 2, "one source per COPY: {}", i.args);
            (words[0].to_string(), words[1].to_string())
        })
        .collect()
}

/// The repo file the image has at `path`, if a COPY from the build context put one there.
fn repo_file_for_image_path(path: &str) -> Option<PathBuf> {
    for (src, dst) in dockerfile_context_copies() {
        if dst.ends_with('/') {
            if let Some(rest) = path.strip_prefix(&dst) {
                let p = root().join(&src).join(rest);
                return p.is_file().then_some(p);
            }
        } else if path == dst {
            let p = root().join(&src);
            return p.is_file().then_some(p);
        }
    }
    None
}

// ---- tests: the environment ------------------------------------------------------------------------

#[test]
fn environment_names_are_derived_from_the_source() {
    let orch = env_read_by("jetsaga-orchestrator");
    let order = env_read_by("jetsaga-order");
    let cli = env_read_by("jetsaga");
    eprintln!("jetsaga-orchestrator reads {orch:?}");
    eprintln!("jetsaga-order reads {order:?}");
    eprintln!("jetsaga reads {cli:?}");
    for name in [
        "NATS_URL",
        "NATS_USER",
        "NATS_PASSWORD",
        "JETSAGA_DEFINITIONS",
        "JETSAGA_ACK_WAIT_SECS",
        "RUST_LOG",
        "LOG_FORMAT",
    ] {
        assert!(orch.contains(name), "orchestrator: {name} not found");
    }
    for name in [
        "NATS_URL",
        "JETSAGA_DB",
        "JETSAGA_SEED",
        "JETSAGA_SQLITE_SYNC",
        // Read through a lookup closure in participants/src/config.rs.
        "JETSAGA_FAULT_DELAY_MS",
        "RUST_LOG",
        "LOG_FORMAT",
    ] {
        assert!(order.contains(name), "jetsaga-order: {name} not found");
    }
    assert!(cli.contains("NATS_URL") && cli.contains("NATS_PASSWORD"));
    if !read("orchestrator/src/bin/jetsaga.rs").contains("telemetry") {
        assert!(!cli.contains("RUST_LOG"), "the CLI sets up no logging");
    }
    // Each binary reads its own configuration only.
    assert!(!order.contains("JETSAGA_DEFINITIONS"));
    assert!(!orch.contains("JETSAGA_DB"));
    // Stream names are variable-shaped literals in a file that reads no variable.
    assert!(!orch.contains("JETSAGA_REQUESTS") && !orch.contains("JETSAGA_COMMANDS"));
}

#[test]
fn source_scanner_ignores_comments_and_test_code() {
    let src = r##"
        // std::env::var("IN_A_COMMENT")
        /* env = "IN_A_BLOCK" /* nested */ still comment */
        #[arg(long, env = "REAL_ONE")] x: u8,
        fn f() -> char { let _ = "{"; '}' }
        fn g() { std::env::var("REAL_TWO"); let _ = r#"a "quoted" { brace"#; }
        #[cfg(test)]
        mod tests { fn t() { std::env::var("ONLY_IN_TESTS"); let _ = '{'; } }
        fn h() { lookup("REAL_THREE") }
    "##;
    let names = env_reads(&strip_comments_and_tests(src));
    let expected: BTreeSet<String> = ["REAL_ONE", "REAL_TWO", "REAL_THREE"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(names, expected);
}

#[test]
fn environment_holds_only_variables_the_binaries_read() {
    let passwords: BTreeSet<String> = NATS_USERS.iter().map(|u| password_var(u)).collect();
    for (name, svc) in services() {
        let env = env_of(svc);
        if name == "nats" {
            // Container-only: the passwords nats.conf reads.
            for k in env.keys() {
                assert!(
                    passwords.contains(k),
                    "nats: {k} is not one of the password variables {passwords:?}"
                );
            }
            for v in nats_conf_variables() {
                assert!(
                    env.contains_key(&v),
                    "nats.conf reads ${v} but the nats service does not pass it"
                );
            }
        } else if !svc["build"].is_badvalue() {
            let cmd = command_of(&name);
            let read = env_read_by(&cmd[0]);
            for k in env.keys() {
                if read.contains(k) {
                    continue;
                }
                panic!(
                    "service {name}: {k} is not read by {} (it reads {read:?})",
                    cmd[0]
                );
            }
        } else if is_nats_box(&name) {
            for k in env.keys() {
                assert!(
                    NATS_CLI_ENV.contains(&k.as_str()),
                    "service {name}: the nats CLI does not read {k}"
                );
            }
        } else {
            panic!("service {name}: no rule for its environment; teach deploy/tests/compose.rs");
        }
    }
}

#[test]
fn every_process_uses_its_own_nats_user_and_password_variable() {
    let nats_env = env_of(service("nats"));
    let users: Vec<(&str, &str)> = PROCESSES
        .iter()
        .map(|(s, _, u)| (*s, *u))
        .chain(TOOLS.iter().copied())
        .collect();
    for (name, user) in users {
        let env = env_of(service(name));
        assert_eq!(
            env.get("NATS_URL").map(String::as_str),
            Some(NATS_URL),
            "{name}: NATS_URL"
        );
        assert_eq!(
            env.get("NATS_USER").map(String::as_str),
            Some(user),
            "{name}: NATS_USER"
        );
        assert_eq!(
            env.get("NATS_PASSWORD"),
            Some(&password_value(user)),
            "{name}: NATS_PASSWORD must come from {} with a dev default",
            password_var(user)
        );
        assert_eq!(
            nats_env.get(&password_var(user)),
            Some(&password_value(user)),
            "the nats service must get {} (nats.conf reads it)",
            password_var(user)
        );
    }
    // Every process is a different user.
    let process_users: BTreeSet<&str> = PROCESSES.iter().map(|p| p.2).collect();
    assert_eq!(process_users.len(), PROCESSES.len());
}

#[test]
fn nats_users_are_defined_in_nats_conf() {
    let defined = nats_conf_users();
    assert!(
        !defined.is_empty(),
        "nats.conf defines no users: expected account JETSAGA with users {NATS_USERS:?}"
    );
    for (name, svc) in services() {
        if let Some(user) = env_of(svc).get("NATS_USER") {
            assert!(
                defined.contains(user),
                "service {name}: NATS_USER={user} is not a user in nats.conf ({defined:?})"
            );
        }
    }
    for u in NATS_USERS {
        assert!(defined.contains(*u), "nats.conf has no user {u}");
    }
}

#[test]
fn nats_conf_parsers_read_users_variables_and_ports() {
    let conf = nats_conf_text(
        "listen: 127.0.0.1:4222 # client port\nhttp: 127.0.0.1:8222\n\
         accounts { JETSAGA { users: [\n  { user: orchestrator, password: $JETSAGA_ORCHESTRATOR_PASSWORD }\n\
           { user: \"client\", password: $JETSAGA_CLIENT_PASSWORD }\n  # { user: commented, password: $NOPE }\n\
           { user: y, permissions: { publish: { allow: [\"$JS.API.>\", \"$KV.sagas.>\"] } } }\n] } }\n",
    );
    assert_eq!(conf_users(&conf), ["orchestrator", "client", "y"]);
    // Quoted values are literals (a bcrypt hash, a subject), not variable references.
    let hashed = format!("{conf}\n{{ user: x, password: \"$2a$11$Abc\" }}");
    assert_eq!(
        conf_variables(&hashed),
        ["JETSAGA_ORCHESTRATOR_PASSWORD", "JETSAGA_CLIENT_PASSWORD"]
    );
    assert_eq!(nats_conf_monitor_port(&conf), Some(8222));
    assert_eq!(nats_conf_listen_host(&conf).as_deref(), Some("127.0.0.1"));
    assert_eq!(nats_conf_monitor_port("http_port: 8223"), Some(8223));
}

// ---- tests: services -------------------------------------------------------------------------------

#[test]
fn services_run_workspace_binaries_from_the_one_image() {
    let bins = workspace_bins();
    let mut images = BTreeSet::new();
    for name in jetsaga_services() {
        let svc = service(&name);
        let build = &svc["build"];
        let context = build
            .as_str()
            .or_else(|| build["context"].as_str())
            .unwrap_or_else(|| panic!("{name}: build needs a context"));
        assert_eq!(context, ".", "{name}: build context is the repo root");
        if let Some(df) = build["dockerfile"].as_str() {
            assert_eq!(df, "Dockerfile", "{name}: the repo's Dockerfile");
        }
        images.insert(image_of(&name));
        let cmd = command_of(&name);
        assert!(
            bins.contains_key(&cmd[0]),
            "{name}: runs {}, which the workspace does not build",
            cmd[0]
        );
        assert!(
            BINARIES.iter().any(|(b, _)| *b == cmd[0]),
            "{name}: {} is not one of the image's binaries",
            cmd[0]
        );
    }
    assert_eq!(
        images.len(),
        1,
        "one image for all jetsaga services: {images:?}"
    );
    for (name, bin, _) in PROCESSES {
        assert_eq!(&command_of(name)[0], bin, "service {name} runs {bin}");
    }
    assert_eq!(&command_of("cli")[0], "jetsaga");
    for (bin, pkg) in BINARIES {
        assert_eq!(bins.get(*bin).map(|p| p.name.as_str()), Some(*pkg), "{bin}");
    }
}

#[test]
fn processes_wait_for_healthy_nats_and_restart_on_failure() {
    for (name, _, _) in PROCESSES {
        let svc = service(name);
        assert_eq!(
            svc["depends_on"]["nats"]["condition"].as_str(),
            Some("service_healthy"),
            "{name}: depends_on nats with condition service_healthy"
        );
        assert_eq!(
            svc["restart"].as_str(),
            Some("on-failure"),
            "{name}: restart"
        );
        assert!(
            svc["profiles"].is_badvalue(),
            "{name}: runs with a plain `docker compose up`"
        );
    }
    for (name, _) in TOOLS {
        let svc = service(name);
        assert_eq!(
            svc["depends_on"]["nats"]["condition"].as_str(),
            Some("service_healthy"),
            "{name}: depends_on nats with condition service_healthy"
        );
        assert_eq!(
            str_list(&svc["profiles"], name),
            [TOOLS_PROFILE],
            "{name}: tools are only started by `docker compose run`"
        );
    }
    let all: BTreeSet<String> = services().into_iter().map(|(n, _)| n).collect();
    let known: BTreeSet<String> = std::iter::once("nats")
        .chain(PROCESSES.iter().map(|p| p.0))
        .chain(TOOLS.iter().map(|t| t.0))
        .map(String::from)
        .collect();
    assert_eq!(all, known, "the services of docker-compose.yml");
}

#[test]
fn nats_is_the_pinned_server_with_the_repo_config_a_volume_and_a_healthcheck() {
    // The image tag matches the server the tests and scripts/run.sh use.
    let pinned = re(r#"NATS_SERVER_VERSION:-([0-9.]+)"#)
        .captures(&read("scripts/install-nats.sh"))
        .expect("scripts/install-nats.sh pins NATS_SERVER_VERSION")[1]
        .to_string();
    let image = image_of("nats");
    assert_eq!(
        image,
        format!("nats:{pinned}-alpine"),
        "official image, pinned tag"
    );

    let cmd = command_of("nats");
    assert_eq!(cmd[0], "nats-server");
    let config = flag_value(&cmd, &["-c", "--config"]).expect("nats-server --config");
    let volumes = volumes_of("nats");
    let conf_mount = volumes
        .iter()
        .find(|(src, _)| src == "./nats.conf")
        .expect("nats mounts ./nats.conf");
    assert!(
        root().join("nats.conf").is_file(),
        "nats.conf is in the repo"
    );
    // Either nats.conf itself, or a compose config that includes it and overrides the hosts.
    let effective = if config == conf_mount.1 {
        read("nats.conf")
    } else {
        let cfg = service("nats")["configs"]
            .as_vec()
            .and_then(|v| v.iter().find(|c| c["target"].as_str() == Some(config)))
            .unwrap_or_else(|| panic!("--config {config} is neither nats.conf nor a config"));
        let source = cfg["source"].as_str().expect("config source");
        let content = compose()["configs"][source]["content"]
            .as_str()
            .expect("inline config content")
            .to_string();
        let include = re(r#"(?m)^\s*include\s+"?([^\s"]+)"?"#)
            .captures(&content)
            .expect("the wrapper includes nats.conf")[1]
            .to_string();
        let dir = Path::new(config).parent().unwrap();
        let included = dir.join(include.trim_start_matches("./"));
        assert_eq!(
            included,
            Path::new(&conf_mount.1),
            "the wrapper includes the mounted nats.conf"
        );
        // Later keys override the included ones.
        format!("{}\n{content}", read("nats.conf"))
    };
    let effective = nats_conf_text(&effective);
    let last = |f: fn(&str) -> Option<String>| effective.lines().filter_map(f).next_back();
    // A host given with -a overrides `listen`'s; no flag sets the monitoring host.
    let listen = flag_value(&cmd, &["-a", "--addr", "--net"])
        .map(String::from)
        .or_else(|| last(nats_conf_listen_host));
    let http = last(nats_conf_http_host);
    assert_eq!(
        listen.as_deref(),
        Some("0.0.0.0"),
        "clients reach nats from other containers"
    );
    assert!(
        matches!(http.as_deref(), None | Some("0.0.0.0")),
        "the monitoring port listens on every interface, not {http:?}"
    );
    let monitor = effective
        .lines()
        .filter_map(nats_conf_monitor_port)
        .next_back()
        .or_else(|| flag_value(&cmd, &["-m", "--http_port"]).map(|p| p.parse().unwrap()))
        .expect("monitoring port set");
    assert_eq!(monitor, 8222);

    // JetStream on a named volume: --store_dir is the volume's mount point (or inside it).
    let store = flag_value(&cmd, &["-sd", "--store_dir"]).expect("nats-server --store_dir");
    assert!(
        volumes.iter().any(|(src, dst)| declared_volumes().contains(src)
            && Path::new(store).starts_with(dst)),
        "--store_dir {store} is on a named volume: {volumes:?}"
    );

    // Healthcheck on the monitoring port, with a tool the alpine image has (busybox wget).
    let hc = healthcheck_text("nats");
    assert!(
        image.ends_with("-alpine") || !hc.contains("wget"),
        "wget needs the alpine image"
    );
    assert!(
        hc.contains(&format!(":{monitor}/healthz")),
        "nats healthcheck hits /healthz on {monitor}: {hc}"
    );
    let ports = ports_of("nats");
    for p in [4222, monitor] {
        assert!(
            ports
                .iter()
                .any(|(ip, h, c)| ip == "127.0.0.1" && *h == p && *c == p),
            "nats publishes {p} on 127.0.0.1: {ports:?}"
        );
    }
}

#[test]
fn participants_keep_their_sqlite_file_on_their_own_volume() {
    let declared = declared_volumes();
    let mut used = BTreeSet::new();
    for (name, _, _) in PROCESSES {
        let volumes = volumes_of(name);
        for (src, _) in &volumes {
            if !src.starts_with('.') && !src.starts_with('/') {
                assert!(
                    declared.contains(src),
                    "{name}: volume {src} is not declared"
                );
                assert!(
                    used.insert(src.clone()),
                    "volume {src} is shared by two services"
                );
            }
        }
        let env = env_of(service(name));
        if !env_read_by(&command_of(name)[0]).contains("JETSAGA_DB") {
            assert!(!env.contains_key("JETSAGA_DB"));
            continue;
        }
        let db = env
            .get("JETSAGA_DB")
            .unwrap_or_else(|| panic!("{name}: JETSAGA_DB must point into its volume"));
        assert_eq!(db, &format!("/data/{name}.sqlite"), "{name}: JETSAGA_DB");
        let dir = Path::new(db).parent().unwrap();
        assert!(
            volumes
                .iter()
                .any(|(src, dst)| declared.contains(src) && Path::new(dst) == dir),
            "{name}: {} is not a named volume ({volumes:?})",
            dir.display()
        );
    }
    used.extend(volumes_of("nats").into_iter().map(|(s, _)| s));
    for v in &declared {
        assert!(used.contains(v), "volume {v} is declared but not used");
    }
}

#[test]
fn files_named_in_the_environment_are_in_the_image() {
    for name in jetsaga_services() {
        let env = env_of(service(&name));
        for key in ["JETSAGA_SEED", "JETSAGA_DEFINITIONS"] {
            let Some(value) = env.get(key) else { continue };
            for path in value.split(',') {
                let file = repo_file_for_image_path(path).unwrap_or_else(|| {
                    panic!("{name}: {key}={path} is not a file the Dockerfile copies from the repo")
                });
                assert!(file.is_file());
            }
        }
    }
    // The orchestrator runs the repo's definitions, the participants start from the seed.
    assert!(env_of(service("orchestrator")).contains_key("JETSAGA_DEFINITIONS"));
    for name in ["order", "payment", "inventory"] {
        assert!(
            env_of(service(name)).contains_key("JETSAGA_SEED"),
            "{name}: seed"
        );
    }
}

#[test]
fn metrics_ports_and_healthchecks_match_the_metrics_address() {
    let mut host_ports = BTreeSet::new();
    for (name, _) in services() {
        for (_, host, _) in ports_of(&name) {
            assert!(host_ports.insert(host), "host port {host} published twice");
        }
    }
    for (name, _, _) in PROCESSES {
        let env = env_of(service(name));
        let Some(addr) = env.get("JETSAGA_METRICS_ADDR") else {
            continue;
        };
        let port: u16 = addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or_else(|| panic!("{name}: JETSAGA_METRICS_ADDR={addr} has no port"));
        assert!(
            addr.starts_with("0.0.0.0:"),
            "{name}: metrics must listen on every interface in a container"
        );
        let hc = healthcheck_text(name);
        assert!(
            hc.contains(&format!("/{port}")) || hc.contains(&format!(":{port}")),
            "{name}: healthcheck must use port {port}: {hc}"
        );
        assert!(hc.contains("/healthz"), "{name}: healthcheck uses /healthz");
        assert!(
            ports_of(name)
                .iter()
                .any(|(ip, _, c)| ip == "127.0.0.1" && *c == port),
            "{name}: publishes the metrics port on 127.0.0.1"
        );
    }
}

// ---- tests: Dockerfile -----------------------------------------------------------------------------

#[test]
fn dockerfile_builds_and_copies_exactly_the_binaries_compose_runs() {
    let (built, args) = dockerfile_built_bins();
    assert!(args.contains("--release"), "release build: {args}");
    assert!(
        args.contains("--locked"),
        "build with the committed Cargo.lock: {args}"
    );
    let copied = dockerfile_copied_bins();
    let run: BTreeSet<String> = jetsaga_services()
        .iter()
        .map(|s| command_of(s)[0].clone())
        .collect();
    let contract: BTreeSet<String> = BINARIES.iter().map(|(b, _)| b.to_string()).collect();
    assert_eq!(built, copied, "the Dockerfile copies what it builds");
    if let Some((_, strip)) = args.split_once("strip ") {
        let stripped: BTreeSet<String> = re(r"target/release/([A-Za-z0-9_-]+)")
            .captures_iter(strip)
            .map(|c| c[1].to_string())
            .collect();
        assert_eq!(stripped, built, "every built binary is stripped");
    }
    assert_eq!(
        copied, run,
        "the image holds exactly the binaries compose runs"
    );
    assert_eq!(run, contract);
    let bins = workspace_bins();
    for b in &built {
        assert!(bins.contains_key(b), "the workspace has no binary {b}");
    }
    // Dependencies are cooked for exactly the packages of those binaries.
    let cook = dockerfile()
        .iter()
        .flat_map(|s| &s.instructions)
        .find(|i| i.keyword == "RUN" && i.args.contains("cargo chef cook"))
        .expect("dependencies built in their own layer (cargo chef cook)");
    let cooked: BTreeSet<String> = re(r"(?:--package|-p)[ =]([A-Za-z0-9_-]+)")
        .captures_iter(&cook.args)
        .map(|c| c[1].to_string())
        .collect();
    let packages: BTreeSet<String> = built.iter().map(|b| bins[b].name.clone()).collect();
    assert_eq!(cooked, packages, "cargo chef cook --package list");
    assert!(cook.args.contains("--release") && cook.args.contains("--locked"));
}

#[test]
fn dockerfile_pins_its_images_and_runs_unprivileged() {
    let stages = dockerfile();
    assert!(stages.len() >= 2, "multi-stage build");
    let pinned = re(r"^[a-z0-9./-]+:[A-Za-z0-9.-]*[0-9][A-Za-z0-9.-]*(@sha256:[0-9a-f]{64})?$");
    let names: BTreeSet<&str> = stages.iter().filter_map(|s| s.name.as_deref()).collect();
    for s in stages {
        if names.contains(s.image.as_str()) {
            continue; // FROM an earlier stage
        }
        assert!(
            pinned.is_match(&s.image),
            "FROM {} is not a pinned tag",
            s.image
        );
    }
    let builder = &stages[0].image;
    let runtime = &final_stage().image;
    assert!(
        builder.starts_with("rust:") && builder.ends_with("-bookworm"),
        "{builder}"
    );
    assert!(
        (runtime.starts_with("debian:12.") || runtime.starts_with("debian:bookworm-"))
            && runtime.ends_with("-slim"),
        "runtime is Debian 12 (bookworm) slim like the builder, for its glibc: {runtime}"
    );

    let last = &final_stage().instructions;
    let user = last
        .iter()
        .rev()
        .find(|i| i.keyword == "USER")
        .expect("the runtime stage sets USER");
    let who = user.args.split(':').next().unwrap();
    assert!(
        who != "root" && who != "0",
        "runs as non-root, not {}",
        user.args
    );
    let workdir = last.iter().rev().find(|i| i.keyword == "WORKDIR");
    assert_eq!(workdir.map(|i| i.args.as_str()), Some("/data"));
    let run = last
        .iter()
        .filter(|i| i.keyword == "RUN")
        .map(|i| i.args.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        run.contains("mkdir -p /data") && run.contains("chown"),
        "/data exists and belongs to the runtime user"
    );
    // The seed and the definitions are in the image.
    assert!(repo_file_for_image_path("/usr/share/jetsaga/seed/default.json").is_some());
    assert!(repo_file_for_image_path("/usr/share/jetsaga/definitions/order.json").is_some());
}

#[test]
fn dockerignore_keeps_build_output_out_and_sources_in() {
    let patterns: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    let ignored = |path: &str| {
        patterns.iter().any(|p| {
            if let Some(ext) = p.strip_prefix("**/*") {
                path.ends_with(ext)
            } else {
                let p = p.trim_end_matches('/');
                path == p || path.starts_with(&format!("{p}/"))
            }
        })
    };
    for out in ["target", ".git", ".venv", ".run"] {
        assert!(ignored(out), ".dockerignore must exclude {out}");
    }
    let mut needed = vec!["Cargo.toml".to_string(), "Cargo.lock".to_string()];
    let root = root();
    for p in workspace() {
        let rel = p
            .dir
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .to_string();
        needed.push(format!("{rel}/Cargo.toml"));
        needed.push(format!("{rel}/src"));
    }
    needed.extend(dockerfile_context_copies().into_iter().map(|(src, _)| src));
    // Files compiled into the binaries.
    let include = re(r#"include_(?:str|bytes)!\(\s*"([^"]+)"\s*\)"#);
    for p in workspace() {
        let mut sources: Vec<PathBuf> = p.bins.values().cloned().collect();
        sources.extend(p.lib.clone());
        for file in sources.iter().flat_map(|f| module_files(f)) {
            let text = fs::read_to_string(&file).unwrap();
            for c in include.captures_iter(&text) {
                let target = file.parent().unwrap().join(&c[1]);
                let target = target
                    .canonicalize()
                    .unwrap_or_else(|e| panic!("{}: include of {}: {e}", file.display(), &c[1]));
                let rel = target.strip_prefix(root.canonicalize().unwrap()).unwrap();
                needed.push(rel.to_string_lossy().to_string());
            }
        }
    }
    assert!(
        needed
            .iter()
            .any(|n| n == "orchestrator/definitions/order.json"),
        "the built-in definition is found as an include_str! file"
    );
    for n in needed {
        assert!(
            !ignored(n.trim_end_matches('/')),
            ".dockerignore excludes {n}, which the build needs"
        );
    }
}
