//! Property tests: the loader never panics, and what it accepts is coherent.

use std::path::Path;

use proptest::prelude::*;

use commons_blueprint::{load_str, topo_order, Ref, Template};

/// YAML-ish text assembled from blueprint vocabulary, so that generated
/// inputs get deep into validation instead of failing at the first byte.
fn blueprintish() -> impl Strategy<Value = String> {
    let word = prop::sample::select(vec![
        "name",
        "components",
        "job",
        "process",
        "static",
        "after",
        "env",
        "health",
        "http",
        "route",
        "host",
        "inputs",
        "secrets",
        "generate",
        "from_env",
        "type",
        "default",
        "timeout",
        "retries",
        "a",
        "b",
        "c",
        "web",
        "db",
        "sqlite",
        "volume",
        "postgres",
        "blueprint",
        "with",
        "outputs",
        "version",
        "depends_on_projects",
        "project",
        "weight",
        "resources",
        "memory",
        "cpu",
    ]);
    let value = prop::sample::select(vec![
        "x",
        "\"true\"",
        "{}",
        "[a]",
        "[b, c]",
        "1",
        "0.5",
        "-1",
        "10s",
        "256Mi",
        "~",
        "\"${inputs.a}\"",
        "\"${secrets.a}\"",
        "\"${components.a.port}\"",
        "\"${components.b.url}\"",
        "\"${components.a\"",
        "\"$${x}\"",
        "{ http: / }",
        "{ generate: 32 }",
        "[",
        "]",
        "&a x",
        "*a",
        "\"é\"",
        "|\n  x",
    ]);
    let line = (0usize..4, word, prop::option::of(value)).prop_map(|(indent, k, v)| {
        format!(
            "{}{}:{}",
            "  ".repeat(indent),
            k,
            v.map(|v| format!(" {v}")).unwrap_or_default()
        )
    });
    prop::collection::vec(line, 0..30).prop_map(|lines| lines.join("\n"))
}

/// Blueprints with random components, kinds, `after:` edges and references
/// among a small set of names: mostly valid, sometimes cyclic or dangling.
fn structured() -> impl Strategy<Value = String> {
    let names = ["a", "b", "c", "d", "e"];
    let comp = (
        prop::sample::select(vec!["job", "process", "sqlite", "volume"]),
        prop::collection::vec(prop::sample::select(names.to_vec()), 0..3),
        prop::collection::vec(
            (
                prop::sample::select(names.to_vec()),
                prop::sample::select(vec!["port", "url", "path", "host"]),
            ),
            0..2,
        ),
        prop::bool::ANY,
    );
    prop::collection::vec(comp, 1..6).prop_map(move |comps| {
        let mut out = String::from(
            "name: p\ninputs:\n  i: { default: v }\nsecrets:\n  s: { generate: 16 }\ncomponents:\n",
        );
        for (n, (kind, after, refs, use_input)) in comps.iter().enumerate() {
            out.push_str(&format!("  {}:\n", names[n]));
            match *kind {
                "job" | "process" => {
                    let mut cmd = String::from("run");
                    for (r, attr) in refs {
                        cmd.push_str(&format!(" ${{components.{r}.{attr}}}"));
                    }
                    if *use_input {
                        cmd.push_str(" ${inputs.i} ${secrets.s}");
                    }
                    out.push_str(&format!("    {kind}: \"{cmd}\"\n"));
                }
                other => out.push_str(&format!("    {other}: {{}}\n")),
            }
            if !after.is_empty() {
                out.push_str(&format!("    after: [{}]\n", after.join(", ")));
            }
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn never_panics_on_arbitrary_text(text in ".{0,400}") {
        let _ = load_str(Path::new("/p/commons.yaml"), &text);
    }

    #[test]
    fn accepted_blueprints_are_coherent(text in prop_oneof![blueprintish(), structured()]) {
        match load_str(Path::new("/p/commons.yaml"), &text) {
            Ok(bp) => {
                // Every dependency exists and an order exists.
                for c in bp.components.values() {
                    for d in &c.depends_on {
                        prop_assert!(bp.components.contains_key(d));
                    }
                    for r in c.refs() {
                        match r {
                            Ref::Input { name } => prop_assert!(bp.inputs.contains_key(name)),
                            Ref::Secret { name } => prop_assert!(bp.secrets.contains_key(name)),
                            Ref::Component { name, .. } => prop_assert!(c.depends_on.contains(name)),
                        }
                    }
                }
                prop_assert!(topo_order(&bp.components).is_ok());
            }
            Err(d) => {
                prop_assert!(!d.is_empty());
                for e in d.iter() {
                    prop_assert!(e.line >= 1 && e.column >= 1, "{}", e);
                }
            }
        }
    }

    #[test]
    fn templates_round_trip(text in "[a-z ${}.]{0,40}") {
        if let Ok((t, _)) = Template::parse(&text) {
            let (again, _) = Template::parse(&t.source()).expect("a template's source parses");
            prop_assert_eq!(again, t);
        }
    }
}

#[test]
fn the_structured_generator_reaches_valid_blueprints() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = structured();
    let (mut ok, mut cycles) = (0, 0);
    for _ in 0..500 {
        let text = strategy.new_tree(&mut runner).unwrap().current();
        match load_str(Path::new("/p/commons.yaml"), &text) {
            Ok(_) => ok += 1,
            Err(d) if d.iter().any(|e| e.message.contains("cycle")) => cycles += 1,
            Err(_) => {}
        }
    }
    // The property above is only worth something if both paths are exercised.
    assert!(ok > 50, "only {ok} of 500 generated blueprints were valid");
    assert!(cycles > 5, "only {cycles} of 500 had a cycle");
}
