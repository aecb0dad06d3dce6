use super::*;
use std::collections::HashMap;

fn shape() -> ModelShape {
    ModelShape {
        num_layers: 4,
        num_q_heads: 8,
        num_kv_heads: 2,
        head_dim: 64,
    }
}

#[test]
fn defaults_are_the_spec_and_valid() {
    let c = FreeKvConfig::default();
    assert_eq!(
        (c.page_size, c.budget, c.sink, c.window),
        (32, 2048, 512, 512)
    );
    assert_eq!(c.tau, 0.9);
    assert_eq!(c.dense_layers, vec![0]);
    assert_eq!(c.mode, Mode::FreeKv);
    assert_eq!(c.pages(), (16, 16, 32, 64));
    c.validate(Some(&shape())).unwrap();
    assert!(c.is_dense_layer(0) && !c.is_dense_layer(1));
    let dense = FreeKvConfig {
        mode: Mode::Dense,
        ..Default::default()
    };
    assert!(dense.is_dense_layer(3));
}

#[test]
fn serde_names_and_partial_json() {
    let json = serde_json::to_value(FreeKvConfig::default()).unwrap();
    assert_eq!(json["mode"], "freekv");
    assert_eq!(json["summary"], "min-max");
    assert_eq!(json["pooling"], "softmax-mean");
    assert_eq!(json["device_tier"], "in-place");
    assert_eq!(json["dense_layers"], serde_json::json!([0]));
    let c: FreeKvConfig =
        serde_json::from_str(r#"{"budget": 1024, "mode": "sync", "summary": "centre-mad"}"#)
            .unwrap();
    assert_eq!(c.budget, 1024);
    assert_eq!(c.mode, Mode::Sync);
    assert_eq!(c.summary, SummaryKind::CentreMad);
    assert_eq!(c.sink, 512);
    for (m, name) in Mode::ALL {
        assert_eq!(serde_json::to_value(m).unwrap(), name);
    }
    for (m, name) in DeviceTierLayout::ALL {
        assert_eq!(serde_json::to_value(m).unwrap(), name);
    }
    for (m, name) in PrefillAttention::ALL {
        assert_eq!(serde_json::to_value(m).unwrap(), name);
    }
    for (m, name) in Pooling::ALL {
        assert_eq!(serde_json::to_value(m).unwrap(), name);
    }
    for (m, name) in SummaryKind::ALL {
        assert_eq!(serde_json::to_value(m).unwrap(), name);
    }
    for (m, name) in Selector::ALL {
        assert_eq!(serde_json::to_value(m).unwrap(), name);
    }
    assert!(serde_json::from_str::<FreeKvConfig>(r#"{"mode": "fast"}"#).is_err());
    assert!(serde_json::from_str::<FreeKvConfig>(r#"{"budgett": 5}"#).is_err());
}

#[test]
fn mode_flags() {
    assert!(!Mode::Dense.speculation() && !Mode::Dense.correction());
    assert!(!Mode::Sync.speculation() && !Mode::Sync.correction());
    assert!(Mode::Speculative.speculation() && !Mode::Speculative.correction());
    assert!(Mode::FreeKv.speculation() && Mode::FreeKv.correction());
}

#[test]
fn layer_lists() {
    assert_eq!(parse_layer_list("0,1,5").unwrap(), vec![0, 1, 5]);
    assert_eq!(parse_layer_list("").unwrap(), Vec::<usize>::new());
    assert_eq!(parse_layer_list("  ").unwrap(), Vec::<usize>::new());
    assert_eq!(parse_layer_list(" 3 , 1,3").unwrap(), vec![1, 3]);
    assert!(parse_layer_list("1,,2")
        .unwrap_err()
        .contains("empty entry"));
    assert!(parse_layer_list("a").unwrap_err().contains("\"a\""));
    assert!(parse_layer_list("-1").is_err());
}

fn invalid(f: impl FnOnce(&mut FreeKvConfig)) -> ConfigError {
    let mut c = FreeKvConfig::default();
    f(&mut c);
    c.validate(Some(&shape())).unwrap_err()
}

#[test]
fn every_bad_knob_is_named_with_value_and_range() {
    let e = invalid(|c| c.page_size = 12);
    assert_eq!((e.knob, e.value.as_str()), ("page_size", "12"));
    assert!(e.to_string().contains("8, 16, 32"));
    let e = invalid(|c| c.sink = 100);
    assert_eq!((e.knob, e.value.as_str()), ("sink", "100"));
    assert!(e.valid.contains("multiple of the page size 32"));
    let e = invalid(|c| c.window = 0);
    assert_eq!(e.knob, "window");
    let e = invalid(|c| c.window = 33);
    assert_eq!(e.knob, "window");
    let e = invalid(|c| c.budget = 2050);
    assert_eq!(e.knob, "budget");
    let e = invalid(|c| c.budget = 1024);
    assert_eq!((e.knob, e.value.as_str()), ("budget", "1024"));
    assert!(e.valid.contains("1056"), "{e}");
    let e = invalid(|c| c.tau = 1.5);
    assert_eq!((e.knob, e.value.as_str()), ("tau", "1.5"));
    assert!(e.valid.contains("[-1, 1]"));
    let e = invalid(|c| c.tau = f32::NAN);
    assert_eq!(e.knob, "tau");
    let e = invalid(|c| c.workers = 17);
    assert_eq!((e.knob, e.value.as_str()), ("workers", "17"));
    assert!(e.valid.contains("0 to 16 background threads"), "{e}");
    for bad in [0, 17] {
        let e = invalid(|c| c.shortlist = bad);
        assert_eq!((e.knob, e.value.clone()), ("shortlist", bad.to_string()));
        assert!(e.valid.contains("1 to 16"), "{e}");
    }
    let e = invalid(|c| c.dense_layers = vec![0, 4]);
    assert_eq!(e.knob, "dense_layers");
    assert!(e.to_string().contains("layer 4") && e.to_string().contains("4 layers"));
    // Without a shape the layer list cannot be checked.
    let c = FreeKvConfig {
        dense_layers: vec![99],
        ..Default::default()
    };
    c.validate(None).unwrap();
    let bad_shape = ModelShape {
        num_q_heads: 6,
        num_kv_heads: 4,
        ..shape()
    };
    assert_eq!(
        FreeKvConfig::default()
            .validate(Some(&bad_shape))
            .unwrap_err()
            .knob,
        "model shape"
    );
    // Smallest valid budget: sink + window + one page.
    let c = FreeKvConfig {
        budget: 1056,
        ..Default::default()
    };
    c.validate(Some(&shape())).unwrap();
    // The error converts into anyhow with `?`.
    fn into_anyhow() -> anyhow::Result<()> {
        FreeKvConfig {
            tau: 2.0,
            ..Default::default()
        }
        .validate(None)?;
        Ok(())
    }
    assert!(into_anyhow().unwrap_err().to_string().contains("tau"));
}

#[test]
fn environment_overrides_and_errors() {
    let vars: HashMap<&str, &str> = [
        ("FREEKV_BUDGET", "1024"),
        ("FREEKV_SINK", "128"),
        ("FREEKV_WINDOW", "128"),
        ("FREEKV_TAU", "0.8"),
        ("FREEKV_PAGE_SIZE", "16"),
        ("FREEKV_SUMMARY", "centre-mad"),
        ("FREEKV_POOLING", "max"),
        ("FREEKV_DENSE_LAYERS", ""),
        ("FREEKV_MODE", "speculative"),
        ("FREEKV_DEVICE_TIER", "copy"),
        ("FREEKV_CORRECTION_RATE", "0.25"),
        ("FREEKV_PREFILL_ATTENTION", "engine"),
        ("FREEKV_SELECTOR", "oracle"),
        ("FREEKV_SHORTLIST", "3"),
        ("FREEKV_WORKERS", "3"),
    ]
    .into_iter()
    .collect();
    let c = FreeKvConfig::from_lookup(|n| vars.get(n).map(|s| s.to_string())).unwrap();
    assert_eq!(
        c,
        FreeKvConfig {
            page_size: 16,
            budget: 1024,
            sink: 128,
            window: 128,
            tau: 0.8,
            correction_rate: 0.25,
            summary: SummaryKind::CentreMad,
            pooling: Pooling::Max,
            selector: Selector::Oracle,
            shortlist: 3,
            dense_layers: vec![],
            mode: Mode::Speculative,
            device_tier: DeviceTierLayout::Copy,
            workers: 3,
            prefill_attention: PrefillAttention::Engine,
        }
    );
    c.validate(Some(&shape())).unwrap();
    let one = |name: &'static str, value: &'static str| {
        FreeKvConfig::from_lookup(|n| (n == name).then(|| value.to_string()))
            .unwrap_err()
            .to_string()
    };
    let e = one("FREEKV_MODE", "fast");
    assert!(e.contains("FREEKV_MODE") && e.contains("fast"), "{e}");
    assert!(e.contains("dense, sync, speculative, freekv"), "{e}");
    let e = one("FREEKV_TAU", "high");
    assert!(e.contains("FREEKV_TAU") && e.contains("[-1, 1]"), "{e}");
    let e = one("FREEKV_BUDGET", "-5");
    assert!(e.contains("FREEKV_BUDGET"), "{e}");
    let e = one("FREEKV_DENSE_LAYERS", "0;1");
    assert!(e.contains("FREEKV_DENSE_LAYERS"), "{e}");
    let mut bad = c.clone();
    bad.correction_rate = 1.5;
    let e = bad.validate(Some(&shape())).unwrap_err().to_string();
    assert!(e.contains("correction_rate") && e.contains("1.5"), "{e}");
    let e = one("FREEKV_DEVICE_TIER", "gpu");
    assert!(e.contains("copy, in-place"), "{e}");
    let e = one("FREEKV_POOLING", "avg");
    assert!(e.contains("softmax-mean, mean, max"), "{e}");
    let e = one("FREEKV_SUMMARY", "box");
    assert!(e.contains("min-max, centre-mad"), "{e}");
    assert_eq!(
        FreeKvConfig::from_lookup(|_| None).unwrap(),
        FreeKvConfig::default()
    );
}

#[test]
fn knob_table_names_follow_the_fields_and_round_trip() {
    let names: Vec<&str> = FreeKvConfig::KNOBS.iter().map(|k| k.name).collect();
    let json = serde_json::to_value(FreeKvConfig::default()).unwrap();
    assert_eq!(names.len(), json.as_object().unwrap().len());
    let defaults = FreeKvConfig::default();
    for knob in FreeKvConfig::KNOBS {
        assert!(
            json.get(knob.name).is_some(),
            "{} is not a field",
            knob.name
        );
        assert_eq!(knob.env, format!("FREEKV_{}", knob.name.to_uppercase()));
        assert_eq!(knob.flag, format!("freekv-{}", knob.name.replace('_', "-")));
        assert!(!knob.help.trim().is_empty() && !knob.value_name.is_empty());
        // Writing a value back and parsing it gives the same configuration.
        let mut c = FreeKvConfig {
            budget: 1,
            dense_layers: vec![7],
            mode: Mode::Dense,
            ..Default::default()
        };
        (knob.set)(&mut c, &(knob.show)(&defaults)).unwrap();
        assert_eq!((knob.show)(&c), (knob.show)(&defaults), "{}", knob.name);
    }
    assert!(FreeKvConfig::knob("budget").is_some() && FreeKvConfig::knob("nope").is_none());
}

#[test]
fn policies_an_instance_can_switch_to() {
    let built = FreeKvConfig::default();
    let oracle = Policy {
        mode: Mode::Sync,
        selector: Selector::Oracle,
        shortlist: 2,
    };
    oracle.check(&built).unwrap();
    for bad in [0, 17] {
        let e = Policy {
            shortlist: bad,
            ..built.policy()
        }
        .check(&built)
        .unwrap_err();
        assert_eq!(e.knob, "shortlist");
    }
    // Built dense: no summaries on a device to select from.
    let dense = FreeKvConfig {
        mode: Mode::Dense,
        ..Default::default()
    };
    assert_eq!(oracle.check(&dense).unwrap_err().knob, "mode");
    // Built without correction: no stored query mirrored for the test.
    let sync = FreeKvConfig {
        mode: Mode::Sync,
        ..Default::default()
    };
    let e = built.policy().check(&sync).unwrap_err();
    assert!(e.valid.contains("build it with mode freekv"), "{e}");
    sync.policy().check(&built).unwrap();
}
