//! No import circles between the files of a crate.
//!
//! Modules that import each other cannot be understood, tested or moved
//! one at a time, and circles grow: a helper put in the module that first
//! needed it pulls every other user into a knot (issue 26 found seven agent
//! files in one). So each crate's files must form a graph without cycles:
//! shared pieces go down into modules that import none of their users.
//!
//! This test parses every crate's sources (syn, no compiler) and draws an
//! edge from file A to file B when A names something of B's module: a
//! `use crate::…`/`super::…`/`self::…`, a path such as `crate::b::f()`, or
//! a path through a child module (`driver::qemu::…` in `lib.rs`). A `mod`
//! declaration is not an edge, and neither is anything under
//! `#[cfg(test)]` (tests may reach across). Run it for one crate with
//! `cargo test -p virt8ra --test imports -- agent`.
//!
//! Three more rules are checked on the same parse: the control plane's
//! layers import only downward (`http` -> `workflows` -> `services` ->
//! `state` -> `registry`, see docs/ARCHITECTURE.md), its HTTP layer does
//! not touch the store (a handler parses, calls a service and serializes;
//! the rules and the store calls are the services'), and no production
//! function in the workspace is over 150 lines (a function that long is
//! several steps that want names of their own).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use quote::ToTokens;

/// The crates checked, and whether their circles are a known exception:
/// those are printed, not failed on. Take a crate off the exceptions as
/// soon as it is clean (the test then says so).
///
/// No exceptions now: the server was the last (issue 26 gave it layers).
/// The other crates are not checked yet: their roots define types their
/// modules use while declaring those modules (e.g. `crates/store`).
const CHECKED: &[(&str, bool)] = &[("agent", false), ("server", false)];

/// One crate's module tree: module path (`driver::qemu`) -> its file, and
/// the edges found between files, each with one path that caused it.
struct Graph {
    files: BTreeMap<Vec<String>, PathBuf>,
    edges: BTreeMap<PathBuf, BTreeMap<PathBuf, String>>,
}

/// `#[cfg(test)]`: code compiled only into unit tests.
fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && matches!(&a.meta, syn::Meta::List(l) if l.tokens.to_string() == "test")
    })
}

fn parse(path: &Path) -> syn::File {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    syn::parse_file(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// Finds every module file under `root` (lib.rs or main.rs), recursively.
fn discover(
    file: &Path,
    module: &[String],
    items: &[syn::Item],
    files: &mut BTreeMap<Vec<String>, PathBuf>,
) {
    files
        .entry(module.to_vec())
        .or_insert_with(|| file.to_path_buf());
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let dir = if matches!(name, "lib.rs" | "main.rs" | "mod.rs") {
        file.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        file.with_extension("")
    };
    discover_in(file, &dir, module, items, files);
}

fn discover_in(
    file: &Path,
    dir: &Path,
    module: &[String],
    items: &[syn::Item],
    files: &mut BTreeMap<Vec<String>, PathBuf>,
) {
    for item in items {
        let syn::Item::Mod(m) = item else { continue };
        if is_cfg_test(&m.attrs) {
            continue;
        }
        let mut sub = module.to_vec();
        sub.push(m.ident.to_string());
        match &m.content {
            // An inline module is part of its file.
            Some((_, inner)) => {
                files.insert(sub.clone(), file.to_path_buf());
                discover_in(file, &dir.join(m.ident.to_string()), &sub, inner, files);
            }
            None => {
                let a = dir.join(format!("{}.rs", m.ident));
                let b = dir.join(m.ident.to_string()).join("mod.rs");
                let f = if a.is_file() { a } else { b };
                discover(&f, &sub, &parse(&f).items, files);
            }
        }
    }
}

/// The module an in-crate path names (the longest prefix that is a
/// module), made absolute from `module`; `None` for other crates.
fn resolve(
    files: &BTreeMap<Vec<String>, PathBuf>,
    module: &[String],
    segs: &[String],
) -> Option<Vec<String>> {
    let (mut abs, rest): (Vec<String>, &[String]) = match segs.first()?.as_str() {
        "crate" => (Vec::new(), &segs[1..]),
        "self" => (module.to_vec(), &segs[1..]),
        "super" => {
            let mut m = module.to_vec();
            let mut i = 0;
            while segs.get(i).map(String::as_str) == Some("super") {
                m.pop();
                i += 1;
            }
            (m, &segs[i..])
        }
        first => {
            // A child module of this one, named without `self::`.
            let mut child = module.to_vec();
            child.push(first.to_string());
            if !files.contains_key(&child) {
                return None;
            }
            (module.to_vec(), segs)
        }
    };
    for s in rest {
        abs.push(s.clone());
        if !files.contains_key(&abs) {
            abs.pop();
            break;
        }
    }
    Some(abs)
}

/// Every `a::b::c` path in a token stream (also inside macros and
/// function bodies), as segments; a brace group after `::` ends it.
fn token_paths(ts: TokenStream, out: &mut Vec<Vec<String>>) {
    let toks: Vec<TokenTree> = ts.into_iter().collect();
    let mut i = 0;
    while i < toks.len() {
        if let TokenTree::Group(g) = &toks[i] {
            token_paths(g.stream(), out);
            i += 1;
            continue;
        }
        let TokenTree::Ident(id) = &toks[i] else {
            i += 1;
            continue;
        };
        // Not the middle of a path that started earlier (`::b` of `a::b`).
        let colon = |k: usize| matches!(&toks[k], TokenTree::Punct(p) if p.as_char() == ':');
        let after_colons = i >= 2 && colon(i - 1) && colon(i - 2);
        let mut segs = vec![id.to_string()];
        let mut j = i + 1;
        loop {
            let colons = matches!(toks.get(j), Some(TokenTree::Punct(p)) if p.as_char() == ':')
                && matches!(toks.get(j + 1), Some(TokenTree::Punct(p)) if p.as_char() == ':');
            match (colons, toks.get(j + 2)) {
                (true, Some(TokenTree::Ident(next))) => {
                    segs.push(next.to_string());
                    j += 3;
                }
                _ => break,
            }
        }
        if segs.len() > 1 && !after_colons {
            out.push(segs);
        }
        i = j.max(i + 1);
    }
}

/// `use` trees flattened into paths (a glob or a group ends at its prefix).
fn use_paths(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            use_paths(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => {
            let mut p = prefix.clone();
            p.push(n.ident.to_string());
            out.push(p);
        }
        syn::UseTree::Rename(r) => {
            let mut p = prefix.clone();
            p.push(r.ident.to_string());
            out.push(p);
        }
        syn::UseTree::Glob(_) => out.push(prefix.clone()),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                use_paths(t, prefix, out);
            }
        }
    }
}

/// The paths each module (inline modules apart) names.
fn collect(module: &[String], items: &[syn::Item], out: &mut Vec<(Vec<String>, Vec<String>)>) {
    for item in items {
        let attrs: &[syn::Attribute] = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Use(u) => &u.attrs,
            syn::Item::Struct(s) => &s.attrs,
            syn::Item::Enum(e) => &e.attrs,
            syn::Item::Const(c) => &c.attrs,
            syn::Item::Static(s) => &s.attrs,
            syn::Item::Trait(t) => &t.attrs,
            syn::Item::Type(t) => &t.attrs,
            syn::Item::Macro(m) => &m.attrs,
            _ => &[],
        };
        if is_cfg_test(attrs) {
            continue;
        }
        let mut paths = Vec::new();
        match item {
            syn::Item::Mod(m) => {
                if let Some((_, inner)) = &m.content {
                    let mut sub = module.to_vec();
                    sub.push(m.ident.to_string());
                    collect(&sub, inner, out);
                }
                continue;
            }
            syn::Item::Use(u) => use_paths(&u.tree, &mut Vec::new(), &mut paths),
            other => token_paths(other.to_token_stream(), &mut paths),
        }
        out.extend(paths.into_iter().map(|p| (module.to_vec(), p)));
    }
}

fn graph(src: &Path) -> Graph {
    let root = ["lib.rs", "main.rs"]
        .iter()
        .map(|f| src.join(f))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{} has no lib.rs or main.rs", src.display()));
    let mut files = BTreeMap::new();
    let root_items = parse(&root).items;
    discover(&root, &[], &root_items, &mut files);
    let mut edges: BTreeMap<PathBuf, BTreeMap<PathBuf, String>> = BTreeMap::new();
    let unique: BTreeSet<(PathBuf, Vec<String>)> = files
        .iter()
        .map(|(m, f)| (f.clone(), m.clone()))
        .filter(|(f, m)| files.get(&m[..m.len().saturating_sub(1)]) != Some(f) || m.is_empty())
        .collect();
    for (file, module) in unique {
        let mut named = Vec::new();
        collect(&module, &parse(&file).items, &mut named);
        for (from_mod, segs) in named {
            let Some(target) = resolve(&files, &from_mod, &segs) else {
                continue;
            };
            let to = files[&target].clone();
            if to != file {
                edges
                    .entry(file.clone())
                    .or_default()
                    .entry(to)
                    .or_insert_with(|| segs.join("::"));
            }
        }
    }
    Graph { files, edges }
}

/// The circles: strongly connected components of more than one file
/// (Tarjan's algorithm), each sorted.
fn circles(g: &Graph) -> Vec<Vec<PathBuf>> {
    struct T<'a> {
        g: &'a Graph,
        index: HashMap<&'a Path, usize>,
        low: HashMap<&'a Path, usize>,
        stack: Vec<&'a Path>,
        on: BTreeSet<&'a Path>,
        out: Vec<Vec<PathBuf>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a Path) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        let g = t.g;
        for w in g.edges.get(v).into_iter().flat_map(|m| m.keys()) {
            let w = w.as_path();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                scc.push(w.to_path_buf());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                t.out.push(scc);
            }
        }
    }
    let mut t = T {
        g,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    let all: BTreeSet<&Path> = g.files.values().map(PathBuf::as_path).collect();
    for f in all {
        if !t.index.contains_key(f) {
            visit(&mut t, f);
        }
    }
    t.out.sort();
    t.out
}

/// The circles of one crate in words: its files and the edges between them.
fn describe(src: &Path, g: &Graph, cs: &[Vec<PathBuf>]) -> String {
    let rel = |p: &Path| p.strip_prefix(src).unwrap_or(p).display().to_string();
    let mut s = String::new();
    for c in cs {
        s += &format!("circle of {} files:\n", c.len());
        for from in c {
            for (to, via) in g.edges.get(from).into_iter().flatten() {
                if c.contains(to) {
                    s += &format!("  {} -> {} ({via})\n", rel(from), rel(to));
                }
            }
        }
    }
    s
}

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn check(name: &str) -> Result<(), String> {
    let src = crates_dir().join(name).join("src");
    let g = graph(&src);
    let cs = circles(&g);
    if cs.is_empty() {
        Ok(())
    } else {
        Err(describe(&src, &g, &cs))
    }
}

#[test]
fn the_agent_has_no_import_circles() {
    if let Err(e) = check("agent") {
        panic!("crates/agent has import circles; move the shared piece down into a module that imports none of its users:\n{e}");
    }
}

#[test]
fn checked_crates_have_no_import_circles_but_the_known_exceptions() {
    let mut failures = Vec::new();
    for &(name, known) in CHECKED {
        match (check(name), known) {
            (Ok(()), false) => {}
            (Err(e), true) => {
                eprintln!("crates/{name}: known import circles (a KNOWN EXCEPTION in CHECKED):\n{e}")
            }
            (Ok(()), true) => failures.push(format!(
                "crates/{name} has no import circles any more: take it off the exceptions in CHECKED"
            )),
            (Err(e), false) => failures.push(format!("crates/{name} has import circles:\n{e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The check itself: a crate written with a circle is caught, through a
/// `use`, a path in a function body, a path inside a macro and `super::`;
/// the same crate with the shared piece moved down is clean.
#[test]
fn the_check_finds_a_circle_and_passes_without_it() {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    std::fs::create_dir_all(src.join("driver")).expect("mkdir");
    let write = |f: &str, s: &str| std::fs::write(src.join(f), s).expect("write");
    write(
        "lib.rs",
        "pub mod a;\npub mod b;\npub mod c;\npub mod driver;\n",
    );
    write("a.rs", "use crate::b::Thing;\npub fn helper() {}\n");
    write("b.rs", "pub struct Thing;\nfn f() { crate::c::g(); }\n");
    write(
        "c.rs",
        "pub fn g() { tokio::select! { _ = x => crate::a::helper() } }\n\
         #[cfg(test)] mod tests { use crate::driver::qemu::Q; }\n",
    );
    write("driver/mod.rs", "pub mod qemu;\npub trait Driver {}\n");
    write("driver/qemu.rs", "use super::Driver;\npub struct Q;\n");
    let g = graph(&src);
    let cs = circles(&g);
    assert_eq!(cs.len(), 1, "{}", describe(&src, &g, &cs));
    let names: Vec<String> = cs[0]
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(names, ["a.rs", "b.rs", "c.rs"]);
    // driver/mod.rs -> driver/qemu.rs by a child path closes a second circle.
    write(
        "driver/mod.rs",
        "pub mod qemu;\npub trait Driver { fn q(&self) -> Option<&qemu::Q>; }\n",
    );
    assert_eq!(circles(&graph(&src)).len(), 2);
    // The helper moved down into a leaf module: no circle.
    write(
        "lib.rs",
        "pub mod a;\npub mod b;\npub mod c;\npub mod driver;\npub mod leaf;\n",
    );
    write("leaf.rs", "pub fn helper() {}\n");
    write(
        "c.rs",
        "pub fn g() { tokio::select! { _ = x => crate::leaf::helper() } }\n",
    );
    write("driver/mod.rs", "pub mod qemu;\npub trait Driver {}\n");
    let g = graph(&src);
    let cs = circles(&g);
    assert!(cs.is_empty(), "{}", describe(&src, &g, &cs));
}

/// The control plane's layers, from the top: a file may import its own
/// layer and the ones below, never one above. `lib.rs` (start-up) may
/// import anything; `error.rs`, `keys.rs`, `serve.rs` and `tls.rs` are the
/// base, below the registry.
fn server_layer(rel: &Path) -> Option<usize> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(match first {
        "lib.rs" => return None,
        "http" => 5,
        "workflows" => 4,
        "services" => 3,
        "state.rs" => 2,
        "registry" => 1,
        _ => 0,
    })
}

/// The edges of a graph that go up a layer, in words.
fn upward_edges(src: &Path, g: &Graph) -> Vec<String> {
    let rel = |p: &Path| p.strip_prefix(src).unwrap_or(p).to_path_buf();
    let mut bad = Vec::new();
    for (from, tos) in &g.edges {
        let Some(lf) = server_layer(&rel(from)) else {
            continue;
        };
        for (to, via) in tos {
            let lt = server_layer(&rel(to)).unwrap_or(usize::MAX);
            if lt > lf {
                bad.push(format!(
                    "  {} -> {} ({via})",
                    rel(from).display(),
                    rel(to).display()
                ));
            }
        }
    }
    bad
}

#[test]
fn the_server_layers_import_only_downward() {
    let src = crates_dir().join("server").join("src");
    let bad = upward_edges(&src, &graph(&src));
    assert!(
        bad.is_empty(),
        "crates/server: imports that go up a layer (http -> workflows -> services -> state -> \
         registry -> base); move the shared piece down:\n{}",
        bad.join("\n")
    );
}

/// A server crate in a temporary directory: `src/lib.rs` with an `http`
/// and a `services` module, each with a `vms` file for the test to write.
/// Returns the directory (removed when dropped) and its `src`.
fn server_tree() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("src");
    for dir in ["http", "services"] {
        std::fs::create_dir_all(src.join(dir)).expect("mkdir");
        std::fs::write(src.join(dir).join("mod.rs"), "pub mod vms;\n").expect("write");
    }
    std::fs::write(src.join("lib.rs"), "pub mod http;\npub mod services;\n").expect("write");
    (d, src)
}

/// The layer check itself: a service that names the HTTP layer is caught.
#[test]
fn the_layer_check_finds_an_upward_import() {
    let (_d, src) = server_tree();
    let write = |f: &str, s: &str| std::fs::write(src.join(f), s).expect("write");
    write(
        "http/vms.rs",
        "fn h() { crate::services::vms::create(); }\n",
    );
    write("services/vms.rs", "pub fn create() {}\n");
    assert!(upward_edges(&src, &graph(&src)).is_empty());
    write(
        "services/vms.rs",
        "pub fn create() {}\nfn f() -> crate::http::vms::Body { todo!() }\n",
    );
    assert_eq!(upward_edges(&src, &graph(&src)).len(), 1);
}

/// What the HTTP layer may name of the store crate: the types its
/// extractors and queries carry (a token's kind and record in `auth.rs`,
/// the VM index's filter in `vms.rs`). Anything else of the store, and
/// any `.store` field (the store itself), belongs in a service.
const HTTP_STORE_TYPES: &[&str] = &["TokenKind", "TokenRecord", "VmFilter"];

/// The places in one file's items that touch the store: a `.store` field
/// (a method call `.store(…)`, such as an atomic's, is not one) or a
/// `virt8ra_store::` path to something not in [`HTTP_STORE_TYPES`];
/// `#[cfg(test)]` code left out.
fn store_uses(file: &Path, items: &[syn::Item], out: &mut Vec<String>) {
    fn scan(file: &Path, ts: TokenStream, out: &mut Vec<String>) {
        let toks: Vec<TokenTree> = ts.into_iter().collect();
        for (i, t) in toks.iter().enumerate() {
            match t {
                TokenTree::Group(g) => scan(file, g.stream(), out),
                TokenTree::Ident(id) if id == "store" => {
                    let dot =
                        i > 0 && matches!(&toks[i - 1], TokenTree::Punct(p) if p.as_char() == '.');
                    let call = matches!(toks.get(i + 1), Some(TokenTree::Group(g))
                        if g.delimiter() == proc_macro2::Delimiter::Parenthesis);
                    if dot && !call {
                        let line = id.span().start().line;
                        out.push(format!("  {}:{line} .store", file.display()));
                    }
                }
                _ => {}
            }
        }
    }
    let mut paths = Vec::new();
    for item in items {
        match item {
            syn::Item::Mod(m) if is_cfg_test(&m.attrs) => continue,
            syn::Item::Fn(f) if is_cfg_test(&f.attrs) => continue,
            syn::Item::Mod(m) => {
                if let Some((_, inner)) = &m.content {
                    store_uses(file, inner, out);
                }
                continue;
            }
            syn::Item::Use(u) => use_paths(&u.tree, &mut Vec::new(), &mut paths),
            other => {
                token_paths(other.to_token_stream(), &mut paths);
                scan(file, other.to_token_stream(), out);
            }
        }
    }
    for p in paths {
        let allowed = p
            .get(1)
            .is_some_and(|t| HTTP_STORE_TYPES.contains(&t.as_str()));
        if p.first().map(String::as_str) == Some("virt8ra_store") && !allowed {
            out.push(format!("  {}: {}", file.display(), p.join("::")));
        }
    }
}

/// The store uses of every file of the server's HTTP layer under `src`.
fn http_store_uses(src: &Path) -> Vec<String> {
    let http = src.join("http");
    let mut out = Vec::new();
    for file in production_files(src) {
        if file.starts_with(&http) {
            store_uses(&file, &parse(&file).items, &mut out);
        }
    }
    out
}

#[test]
fn the_server_http_layer_does_not_touch_the_store() {
    let src = crates_dir().join("server").join("src");
    let uses = http_store_uses(&src);
    assert!(
        uses.is_empty(),
        "crates/server/src/http touches the store; move the rule and the store call into a \
         service (crates/server/src/services) and call that:\n{}",
        uses.join("\n")
    );
}

/// The store check itself: a handler's `.store` call and a store item
/// other than the allowed types are caught, through a `use` and a path in
/// a body; an atomic's `.store(…)`, the allowed types, test code and files
/// outside `http/` are not.
#[test]
fn the_store_check_finds_a_store_call_in_a_handler() {
    let (_d, src) = server_tree();
    let write = |f: &str, s: &str| std::fs::write(src.join(f), s).expect("write");
    write(
        "services/vms.rs",
        "pub async fn get(app: &Ctx) { app.store.get_vm(\"x\").await; }\n",
    );
    let clean = "use virt8ra_store::{TokenKind, VmFilter};\n\
         async fn h(app: Ctx) { crate::services::vms::get(&app).await; a.store(1, Ordering::Release); }\n\
         #[cfg(test)]\nmod tests { use virt8ra_store::StoreError; fn t(app: Ctx) { app.store.x(); } }\n";
    write("http/vms.rs", clean);
    assert_eq!(http_store_uses(&src), Vec::<String>::new());
    write(
        "http/vms.rs",
        &format!(
            "{clean}use virt8ra_store::StoreError;\n\
             async fn g(app: Ctx) {{ let _ = app.store.get_vm(\"x\").await; }}\n\
             fn f() -> virt8ra_store::Result<()> {{ Ok(()) }}\n"
        ),
    );
    let uses = http_store_uses(&src);
    assert_eq!(uses.len(), 3, "{uses:?}");
    assert!(uses.iter().any(|u| u.ends_with(":6 .store")), "{uses:?}");
    assert!(
        uses.iter()
            .any(|u| u.ends_with("virt8ra_store::StoreError")),
        "{uses:?}"
    );
    assert!(
        uses.iter().any(|u| u.ends_with("virt8ra_store::Result")),
        "{uses:?}"
    );
}

/// The longest a production function may be, in lines.
const MAX_FN_LINES: usize = 150;

/// Functions (free, in an impl, or a trait's default body) longer than
/// `max` lines in one file's items, `#[cfg(test)]` code left out.
fn long_fns(file: &Path, items: &[syn::Item], max: usize, out: &mut Vec<String>) {
    let check = |out: &mut Vec<String>, name: String, sig: &syn::Signature, block: &syn::Block| {
        let start = sig.fn_token.span.start().line;
        let end = block.brace_token.span.close().end().line;
        let n = end + 1 - start;
        if n > max {
            out.push(format!("  {}:{start} {name}: {n} lines", file.display()));
        }
    };
    for item in items {
        match item {
            syn::Item::Fn(f) if !is_cfg_test(&f.attrs) => {
                check(out, f.sig.ident.to_string(), &f.sig, &f.block)
            }
            syn::Item::Impl(i) if !is_cfg_test(&i.attrs) => {
                for it in &i.items {
                    if let syn::ImplItem::Fn(f) = it {
                        if !is_cfg_test(&f.attrs) {
                            check(out, f.sig.ident.to_string(), &f.sig, &f.block);
                        }
                    }
                }
            }
            syn::Item::Trait(t) if !is_cfg_test(&t.attrs) => {
                for it in &t.items {
                    if let syn::TraitItem::Fn(f) = it {
                        if let Some(b) = &f.default {
                            check(out, f.sig.ident.to_string(), &f.sig, b);
                        }
                    }
                }
            }
            syn::Item::Mod(m) if !is_cfg_test(&m.attrs) => {
                if let Some((_, inner)) = &m.content {
                    long_fns(file, inner, max, out);
                }
            }
            _ => {}
        }
    }
}

/// Every production source file of a crate: its library's and its
/// binary's module trees (`#[cfg(test)]` modules and tests/ left out).
fn production_files(src: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for root in ["lib.rs", "main.rs"] {
        let root = src.join(root);
        if root.is_file() {
            let mut files = BTreeMap::new();
            discover(&root, &[], &parse(&root).items, &mut files);
            out.extend(files.into_values());
        }
    }
    out
}

#[test]
fn no_production_function_is_over_150_lines() {
    let mut long = Vec::new();
    let mut crates: Vec<PathBuf> = std::fs::read_dir(crates_dir())
        .expect("read crates/")
        .filter_map(|e| e.ok().map(|e| e.path().join("src")))
        .filter(|p| p.is_dir())
        .collect();
    crates.sort();
    assert!(crates.len() > 5, "found only {crates:?}");
    for src in crates {
        for file in production_files(&src) {
            long_fns(&file, &parse(&file).items, MAX_FN_LINES, &mut long);
        }
    }
    assert!(
        long.is_empty(),
        "production functions over {MAX_FN_LINES} lines; split them into named steps:\n{}",
        long.join("\n")
    );
}

/// The length check itself: it counts a function from `fn` to its closing
/// brace, in impls and inline modules, and skips `#[cfg(test)]` code.
#[test]
fn the_length_check_counts_lines() {
    let body = |n: usize| "    let _ = 1;\n".repeat(n);
    let text = format!(
        "fn short() {{\n{}}}\nstruct S;\nimpl S {{\n    fn long(&self) {{\n{}    }}\n}}\n\
         mod m {{\n    fn inner() {{\n{}    }}\n}}\n\
         #[cfg(test)]\nmod tests {{\n    fn skipped() {{\n{}    }}\n}}\n",
        body(8),
        body(9),
        body(10),
        body(50)
    );
    let items = syn::parse_file(&text).expect("parse").items;
    let mut out = Vec::new();
    long_fns(Path::new("x.rs"), &items, 10, &mut out);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out[0].contains("long: 11 lines"), "{out:?}");
    assert!(out[1].contains("inner: 12 lines"), "{out:?}");
}
