use super::*;
use serde_json::json;

fn load(text: &str) -> Pattern {
    load_str("p.yaml", text).unwrap()
}

fn no_params() -> BTreeMap<String, Value> {
    BTreeMap::new()
}

fn task<'a>(spec: &'a WorkflowSpec, key: &str) -> &'a TaskSpec {
    spec.tasks.iter().find(|t| t.key == key).unwrap()
}

#[test]
fn every_builtin_loads_and_instantiates_with_defaults_into_a_valid_dag() {
    let builtins = builtin();
    assert_eq!(builtins.len(), 4);
    for (file, text) in builtins {
        let p = load_str(file, text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(format!("{}.yaml", p.name()), file);
        assert!(!p.description().is_empty(), "{file}");
        let inst = p
            .instantiate(&no_params())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(inst.spec.name, p.name());
        dag::validate(inst.spec.clone()).unwrap();
        assert!(!inst.hints.is_empty(), "{file} ships simulation hints");
        for (key, hint) in &inst.hints {
            check_hint(hint).unwrap_or_else(|e| panic!("{file}: {key}: {e}"));
        }
        assert_eq!(p.validate().unwrap(), inst);
    }
}

#[test]
fn the_review_loop_compiles_to_a_bounded_loop_over_implement_and_review() {
    let p = find("review_feedback_loop", &[]).unwrap();
    let inst = p
        .instantiate(&BTreeMap::from([("max_rounds".to_string(), json!(2))]))
        .unwrap();
    let cycle = task(&inst.spec, "cycle");
    assert_eq!(cycle.depends_on, vec!["plan"]);
    let lp = cycle.repeat.as_ref().unwrap();
    assert_eq!(lp.max_iterations, 2);
    assert_eq!(lp.body[0].depends_on, vec!["plan"]);
    assert_eq!(lp.body[0].input["plan"], json!("${deps.plan.output}"));
    assert_eq!(
        lp.body[0].input["feedback"],
        json!("${prev.review.output.comments}")
    );
    assert_eq!(lp.body[1].depends_on, vec!["implement"]);
    assert_eq!(lp.body[0].capabilities, vec!["code"]);
    let finalize = task(&inst.spec, "finalize");
    assert_eq!(finalize.depends_on, vec!["cycle"]);
    assert_eq!(
        finalize.input["implementation"],
        json!("${deps.cycle.output.outputs.implement}")
    );
    assert_eq!(
        inst.hints["cycle/review"]["outputs"][2]["verdict"],
        json!("approved")
    );
}

#[test]
fn typed_parameters_keep_their_type_in_split_items_and_loop_bounds() {
    let p = load(
        "name: t
parameters:
  mods: {type: list, default: [a, b]}
  rounds: {type: integer, default: 2}
  task: {type: string}
steps:
  - key: fan
    split:
      items: ${params.mods}
      task: {input: {m: '${item}', say: 'do ${params.task} x${params.rounds} over ${params.mods}'}}
  - key: again
    loop:
      max_iterations: ${params.rounds}
      while: {output: w.done, equals: false}
      body:
        - key: w
",
    );
    let inst = p
        .instantiate(&BTreeMap::from([
            ("task".to_string(), json!("it")),
            ("rounds".to_string(), json!(4.0)),
        ]))
        .unwrap();
    let fan = task(&inst.spec, "fan").split.as_ref().unwrap();
    assert_eq!(fan.items, json!(["a", "b"]));
    assert_eq!(fan.task.input["say"], json!("do it x4 over [\"a\",\"b\"]"));
    assert_eq!(fan.task.input["m"], json!("${item}"));
    let lp = task(&inst.spec, "again").repeat.as_ref().unwrap();
    assert_eq!(lp.max_iterations, 4);
}

#[test]
fn a_step_binding_adds_the_dependency_and_becomes_a_deps_binding() {
    let p = load(
        "name: t
steps:
  - key: x
  - key: y
    depends_on: [x]
  - key: z
    input:
      a: ${steps.x.output}
      b: ['${steps.y.output.files.0}']
    split:
      items: ${steps.x.output.list}
      task: {input: {from_y: '${steps.y.output}'}}
",
    );
    let inst = p.instantiate(&no_params()).unwrap();
    let y = task(&inst.spec, "y");
    assert_eq!(y.depends_on, vec!["x"]);
    let z = task(&inst.spec, "z");
    assert_eq!(z.depends_on, vec!["x", "y"]);
    assert_eq!(
        z.input,
        json!({"a": "${deps.x.output}", "b": ["${deps.y.output.files.0}"]})
    );
    let split = z.split.as_ref().unwrap();
    assert_eq!(split.items, json!("${deps.x.output.list}"));
    assert_eq!(split.task.input["from_y"], json!("${deps.y.output}"));
}

#[test]
fn an_unknown_step_reference_is_located_at_the_binding() {
    let text = "name: t
steps:
  - key: a
  - key: b
    input:
      ok: ${steps.a.output}
      bad: ${steps.ghost.output.x}
";
    let err = load(text).instantiate(&no_params()).unwrap_err();
    assert_eq!(err.kind, PatternErrorKind::Binding);
    assert_eq!((err.line, err.column), (Some(7), Some(12)));
    assert!(err.message.contains("unknown step `ghost`"), "{err}");
    assert!(err.message.contains("a, b"), "{err}");
    assert!(
        err.to_string().starts_with("p.yaml:7:12: step `b`: "),
        "{err}"
    );
}

#[test]
fn a_reference_from_a_loop_body_to_an_unknown_step_is_located_in_the_body() {
    let text = "name: t
steps:
  - key: a
  - key: l
    loop:
      max_iterations: 2
      while: {output: w.again, equals: true}
      body:
        - key: w
          input: {x: '${steps.nope.output}'}
";
    let err = load(text).instantiate(&no_params()).unwrap_err();
    assert_eq!((err.line, err.column), (Some(10), Some(23)), "{err}");
    assert!(err.message.starts_with("step `l/w`"), "{err}");
}

#[test]
fn parameter_errors_name_the_parameter() {
    let p = load(
        "name: t
parameters:
  n: {type: integer, default: 1}
  who: {type: string, description: The reviewer}
steps:
  - key: a
    input: {n: '${params.n}', who: '${params.who}'}
",
    );
    let who = || ("who".to_string(), json!("ann"));
    let err = p
        .instantiate(&BTreeMap::from([who(), ("nn".to_string(), json!(1))]))
        .unwrap_err();
    assert_eq!(err.kind, PatternErrorKind::Parameter);
    assert!(err.message.contains("unknown parameter `nn`"), "{err}");
    assert!(err.message.contains("n, who"), "{err}");

    let err = p.instantiate(&no_params()).unwrap_err();
    assert!(
        err.message.contains("missing required parameter `who`"),
        "{err}"
    );
    assert!(err.message.contains("The reviewer"), "{err}");
    assert_eq!((err.line, err.column), (Some(4), Some(3)));

    let err = p
        .instantiate(&BTreeMap::from([who(), ("n".to_string(), json!(1.5))]))
        .unwrap_err();
    assert!(err.message.contains("expected an integer"), "{err}");
    assert_eq!(err.line, Some(3));
    let err = p
        .instantiate(&BTreeMap::from([who(), ("n".to_string(), json!("3"))]))
        .unwrap_err();
    assert!(err.message.contains("got a string"), "{err}");
}

#[test]
fn a_default_of_the_wrong_type_is_rejected_on_load() {
    let err = load_str(
        "p.yaml",
        "name: t\nparameters:\n  n: {type: integer, default: x}\nsteps: [{key: a}]\n",
    )
    .unwrap_err();
    assert_eq!(err.kind, PatternErrorKind::Format);
    assert_eq!(err.line, Some(3));
    assert!(err.message.contains("default must be an integer"), "{err}");
}

#[test]
fn an_unknown_parameter_in_a_binding_is_an_error() {
    let err = load("name: t\nsteps:\n  - key: a\n    input: {x: '${params.nope}'}\n")
        .instantiate(&no_params())
        .unwrap_err();
    assert_eq!(err.kind, PatternErrorKind::Binding);
    assert_eq!((err.line, err.column), (Some(4), Some(17)));
    assert!(err.message.contains("unknown parameter `nope`"), "{err}");
}

#[test]
fn invalid_yaml_is_reported_with_its_location() {
    let err = load_str("p.yaml", "name: t\nsteps:\n  - key: a\n   bad: [\n").unwrap_err();
    assert_eq!(err.kind, PatternErrorKind::Syntax);
    assert!(err.line.is_some() && err.column.is_some(), "{err}");
    assert!(!err.message.contains("line 4 column 4"), "{err}");
    let err = load_str("p.yaml", "name: t\nstepz: []\n").unwrap_err();
    assert_eq!(err.line, Some(2), "{err}");
    assert!(err.message.contains("unknown field `stepz`"), "{err}");
    let err = load_str("p.json", "{\"name\": \"t\",\n \"steps\": [}").unwrap_err();
    assert_eq!((err.line, err.column), (Some(2), Some(12)), "{err}");
    assert!(err.to_string().starts_with("p.json:2:12: "), "{err}");
}

#[test]
fn json_patterns_load_and_locate_errors() {
    let text = r#"{
  "name": "j",
  "steps": [
    {"key": "a"},
    {"key": "b", "input": {"x": "${steps.ghost.output}"}}
  ]
}"#;
    let err = load_str("p.json", text)
        .unwrap()
        .instantiate(&no_params())
        .unwrap_err();
    assert_eq!((err.line, err.column), (Some(5), Some(34)), "{err}");
}

#[test]
fn an_unknown_step_field_is_named_and_located() {
    let text = "name: t
steps:
  - key: a
  - key: b
    input: {}
    dependson: [a]
";
    let err = load(text).instantiate(&no_params()).unwrap_err();
    assert_eq!(err.kind, PatternErrorKind::Step);
    assert!(err.message.contains("step `b`"), "{err}");
    assert!(err.message.contains("unknown field `dependson`"), "{err}");
    assert_eq!((err.line, err.column), (Some(6), Some(5)));
    // Nested in a split's task, and a wrong type located at the step.
    let text =
        "name: t\nsteps:\n  - key: s\n    split:\n      items: [1]\n      task: {executer: x}\n";
    let err = load(text).instantiate(&no_params()).unwrap_err();
    assert!(err.message.contains("`executer`"), "{err}");
    assert_eq!(err.line, Some(6));
    let err = load("name: t\nsteps:\n  - key: a\n    max_attempts: many\n")
        .instantiate(&no_params())
        .unwrap_err();
    assert_eq!(err.line, Some(3), "{err}");
}

#[test]
fn a_cycle_between_steps_is_the_dag_cycle_error() {
    let text = "name: t
steps:
  - key: a
    input: {x: '${steps.b.output}'}
  - key: b
    depends_on: [a]
";
    let err = load(text).instantiate(&no_params()).unwrap_err();
    assert_eq!(err.kind, PatternErrorKind::Dag);
    assert!(err.message.contains("a → b → a"), "{err}");
    assert_eq!(err.line, Some(3));
}

#[test]
fn dag_errors_are_located_at_the_step_and_field() {
    let err = load("name: t\nsteps:\n  - key: a\n  - key: b\n    depends_on: [ghost]\n")
        .instantiate(&no_params())
        .unwrap_err();
    assert_eq!(err.kind, PatternErrorKind::Dag);
    assert_eq!((err.line, err.column), (Some(5), Some(18)), "{err}");
    let err = load("name: t\nsteps:\n  - key: a\n  - key: s\n    depends_on: [a]\n    sync: {}\n    capabilities: [x]\n")
        .instantiate(&no_params())
        .unwrap_err();
    assert_eq!(err.line, Some(7), "{err}");
}

#[test]
fn bad_binding_forms_are_rejected_with_the_accepted_forms() {
    let err = load("name: t\nsteps:\n  - key: a\n    input: {x: '${foo}'}\n")
        .instantiate(&no_params())
        .unwrap_err();
    assert_eq!(err.kind, PatternErrorKind::Binding);
    assert!(err.message.contains("unknown binding `${foo}`"), "{err}");
    assert!(err.message.contains("${params.<name>}"), "{err}");
    assert_eq!((err.line, err.column), (Some(4), Some(17)));
    let err = load("name: t\nsteps:\n  - key: a\n  - key: b\n    input: {x: '${steps.a}'}\n")
        .instantiate(&no_params())
        .unwrap_err();
    assert!(err.message.contains("`${steps.a.output}`"), "{err}");
}

#[test]
fn hints_are_collected_for_top_level_split_and_loop_body_steps() {
    let p = load(
        "name: t
parameters:
  slow: {type: integer, default: 900}
steps:
  - key: a
    simulate: {output: {n: 1}}
  - key: s
    split: {items: [1, 2], task: {}}
    simulate: {latency_ms: '${params.slow}', fail_rate: 0.1}
  - key: l
    loop:
      max_iterations: 3
      while: {output: r.v, equals: no}
      body:
        - key: r
          simulate:
            outputs: [{v: no}, {v: yes}]
",
    );
    let inst = p.instantiate(&no_params()).unwrap();
    assert_eq!(
        inst.hints,
        BTreeMap::from([
            ("a".to_string(), json!({"output": {"n": 1}})),
            (
                "s".to_string(),
                json!({"latency_ms": 900, "fail_rate": 0.1})
            ),
            (
                "l/r".to_string(),
                json!({"outputs": [{"v": "no"}, {"v": "yes"}]})
            ),
        ])
    );
    // The hint is not part of the task.
    assert!(task(&inst.spec, "l").repeat.as_ref().unwrap().body[0].input == json!({}));
}

#[test]
fn malformed_hints_are_rejected() {
    for (hint, expect) in [
        ("{outputz: 1}", "unknown field `outputz`"),
        ("{outputs: []}", "non-empty list"),
        ("{fail_rate: 2}", "fail_rate"),
        ("{latency_ms: -1}", "latency_ms"),
        ("{output: 1, outputs: [1]}", "not both"),
        ("[1]", "expected a mapping"),
    ] {
        let text = format!("name: t\nsteps:\n  - key: a\n    simulate: {hint}\n");
        let err = load(&text).instantiate(&no_params()).unwrap_err();
        assert_eq!(err.kind, PatternErrorKind::Step, "{err}");
        assert!(err.message.contains(expect), "{hint}: {err}");
        assert_eq!((err.line, err.column), (Some(4), Some(5)), "{err}");
    }
    let err = load("name: t\nsteps:\n  - key: a\n  - key: m\n    depends_on: [a]\n    merge: {strategy: first}\n    simulate: {output: 1}\n")
        .instantiate(&no_params())
        .unwrap_err();
    assert!(err.message.contains("a merge node"), "{err}");
}

#[test]
fn file_level_rules_are_checked_on_load() {
    let err = load_str("p.yaml", "name: Bad Name\nsteps: [{key: a}]\n").unwrap_err();
    assert_eq!((err.line, err.column), (Some(1), Some(1)), "{err}");
    let err = load_str("p.yaml", "name: t\nversion: 2\nsteps: [{key: a}]\n").unwrap_err();
    assert_eq!(err.line, Some(2), "{err}");
    let err = load_str("p.yaml", "name: t\nsteps: []\n").unwrap_err();
    assert!(err.message.contains("at least one step"), "{err}");
    let err = load_str("p.yaml", "name: t\nsteps:\n  - key: a\n  - key: a\n").unwrap_err();
    assert_eq!(err.line, Some(4), "{err}");
    let err = load_str("p.yaml", "name: t\nsteps:\n  - input: {}\n").unwrap_err();
    assert!(err.message.contains("no `key`"), "{err}");
}

#[test]
fn command_line_assignments_parse_with_the_declared_types() {
    let p = find("parallel_implementation", &[]).unwrap();
    let params = p
        .parse_assignments(["modules=a, b", "capabilities="])
        .unwrap();
    assert_eq!(params["modules"], json!(["a", "b"]));
    let inst = p.instantiate(&params).unwrap();
    assert_eq!(inst.hints["plan"]["output"]["modules"], json!(["a", "b"]));
    assert!(task(&inst.spec, "plan").capabilities.is_empty());
    assert!(p.parse_assignments(["nope=1"]).is_err());
    assert!(p.parse_assignments(["modules"]).is_err());
}

#[test]
fn find_resolves_paths_builtins_and_extra_dirs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("mine.yml"),
        "name: mine\ndescription: Mine.\nsteps: [{key: a}]\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("broken.yaml"), "name: [\n").unwrap();
    let dirs = vec![dir.path().to_path_buf()];
    assert_eq!(find("mine", &dirs).unwrap().name(), "mine");
    let path = dir.path().join("mine.yml");
    assert_eq!(
        find(path.to_str().unwrap(), &[]).unwrap().file(),
        path.display().to_string()
    );
    assert_eq!(
        find("majority_vote", &dirs).unwrap().file(),
        "majority_vote.yaml"
    );
    let err = find("ghost", &dirs).unwrap_err();
    assert_eq!(err.kind, PatternErrorKind::NotFound);
    assert!(
        err.message.contains("map_reduce") && err.message.contains("mine"),
        "{err}"
    );
    let names: Vec<String> = list(&dirs).into_iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        vec![
            "review_feedback_loop",
            "parallel_implementation",
            "majority_vote",
            "map_reduce",
            "mine"
        ]
    );
}

#[test]
fn the_shipped_files_in_patterns_are_the_builtins() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("patterns");
    for (file, text) in builtin() {
        assert_eq!(std::fs::read_to_string(dir.join(file)).unwrap(), text);
    }
}

#[test]
fn errors_display_with_or_without_a_location() {
    let mut e = PatternError::new(PatternErrorKind::Format, "f.yaml", "bad");
    assert_eq!(e.to_string(), "f.yaml: bad");
    e.line = Some(3);
    e.column = Some(7);
    assert_eq!(e.to_string(), "f.yaml:3:7: bad");
}

#[test]
fn a_pattern_in_json_compiles_like_its_yaml() {
    for (file, text) in builtin() {
        let yaml = load_str(file, text).unwrap();
        let as_json: Value = serde_norway::from_str(text).unwrap();
        let json_file = file.replace(".yaml", ".json");
        let json = load_str(&json_file, &serde_json::to_string_pretty(&as_json).unwrap()).unwrap();
        // The conversion went through a sorted map: compare parameters by name.
        let by_name = |p: &Pattern| {
            let mut v = p.parameters().to_vec();
            v.sort_by(|a, b| a.name.cmp(&b.name));
            v
        };
        assert_eq!(by_name(&json), by_name(&yaml));
        assert_eq!(
            json.instantiate(&no_params()).unwrap(),
            yaml.instantiate(&no_params()).unwrap()
        );
    }
}

#[test]
fn an_empty_parameters_section_and_escaped_bindings_are_accepted() {
    let p = load("name: t\nparameters:\nsteps:\n  - key: a\n    input: {cmd: 'echo $${HOME}'}\n");
    assert!(p.parameters().is_empty());
    let inst = p.instantiate(&no_params()).unwrap();
    assert_eq!(task(&inst.spec, "a").input, json!({"cmd": "echo ${HOME}"}));
}

/// The JSON Schema documents the format the compiler reads: the step fields it lists are the
/// engine's task fields plus `simulate`, and the node specs list the engine's fields.
#[test]
fn the_json_schema_lists_exactly_the_fields_the_compiler_reads() {
    let schema: Value =
        serde_json::from_str(include_str!("../../patterns/pattern.schema.json")).unwrap();
    let props = |def: &str| -> Vec<String> {
        let mut keys: Vec<String> = schema["$defs"][def]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("$defs.{def} has no properties"))
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    };
    let sorted = |v: &[&str]| {
        let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    // Every field of a TaskSpec, all set, as the engine names them on the wire.
    let mut full = TaskSpec::new("k".into());
    full.timeout_seconds = Some(1);
    full.join = Some(Default::default());
    full.sync = Some(Default::default());
    full.merge = Some(serde_json::from_value(json!({"strategy": "first"})).unwrap());
    full.split =
        Some(serde_json::from_value(json!({"items": [1], "task": {}, "join": "all"})).unwrap());
    full.repeat = Some(
        serde_json::from_value(
            json!({"body": [], "while": {"output": "a", "equals": 1}, "max_iterations": 1}),
        )
        .unwrap(),
    );
    let mut task_fields: Vec<String> = serde_json::to_value(&full)
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    task_fields.push("simulate".into());
    task_fields.sort();
    assert_eq!(props("step"), task_fields);
    assert_eq!(props("sync"), sorted(&["on_timeout", "timeout_seconds"]));
    assert_eq!(props("merge"), sorted(&["field", "strategy"]));
    assert_eq!(props("split"), sorted(&["items", "join", "task"]));
    assert_eq!(props("loop"), sorted(&["body", "max_iterations", "while"]));
    assert_eq!(props("simulate"), sorted(&HINT_FIELDS));
}
