//! Bad input gets a clear error naming what is wrong, before any model loads, and a request
//! that cannot fit does not take the others down.

use std::process::Command;
use std::time::{Duration, Instant};

use freekv_integration_tests::engine::{greedy, load, Attention, Source};
use freekv_integration_tests::tiny_models::{filler_text, write_tiny_model, Arch};
use freekv_integration_tests::{paths, serial};
use freekv_plugin::FreeKvConfig;

/// Runs the CLI on a model that does not exist: a knob error must come first.
fn cli_error(flags: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
    let start = Instant::now();
    let out = Command::new(paths::mistralrs_bin()?)
        .args(flags)
        .args([
            "--token-source",
            "none",
            "run",
            "-m",
            "/nonexistent/model",
            "--cpu",
            "-i",
            "hi",
        ])
        .envs(env.iter().copied())
        .output()?;
    assert!(!out.status.success(), "{flags:?} {env:?} was accepted");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{flags:?} took {:?} to fail",
        start.elapsed()
    );
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// A bad-knob case: CLI flags, environment variables, words the error must contain.
type KnobCase<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a [&'a str]);

#[test]
fn cli_rejects_bad_knobs_naming_them() -> anyhow::Result<()> {
    let cases: &[KnobCase] = &[
        (&["--freekv-tau", "3"], &[], &["tau", "3"]),
        (&["--freekv-budget", "100"], &[], &["budget", "100"]),
        (&["--freekv-mode", "fast"], &[], &["mode", "fast"]),
        (&["--freekv-page-size", "12"], &[], &["page_size", "12"]),
        (
            &["--freekv-dense-layers", "0,x"],
            &[],
            &["dense-layers", "x"],
        ),
        (&[], &[("FREEKV_WINDOW", "-5")], &["FREEKV_WINDOW", "-5"]),
        (&[], &[("FREEKV_SINK", "100")], &["sink", "100"]),
    ];
    for (flags, env, words) in cases {
        let text = cli_error(flags, env)?;
        for w in *words {
            assert!(
                text.contains(w),
                "{flags:?} {env:?}: the error does not mention {w:?}:\n{text}"
            );
        }
        assert!(
            !text.contains("panicked"),
            "{flags:?} {env:?} panicked:\n{text}"
        );
    }
    Ok(())
}

#[test]
fn block_size_other_than_the_page_size_is_refused_at_load() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = paths::scratch("bad-block-size")?;
    let model = write_tiny_model(Arch::Llama, &dir, 5)?;
    let out = Command::new(paths::mistralrs_bin()?)
        .args([
            "--token-source",
            "none",
            "--freekv-page-size",
            "32",
            "run",
            "-m",
        ])
        .arg(&model.dir)
        .args([
            "--cpu",
            "--dtype",
            "f32",
            "--pa-block-size",
            "16",
            "-i",
            "hi",
        ])
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "a block size of 16 with 32-token pages was accepted:\n{text}"
    );
    assert!(
        text.contains("--pa-block-size 16") && text.contains("32"),
        "unclear error:\n{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_the_host_tier_fails_alone() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = paths::scratch("host-tier-full")?;
    let model = write_tiny_model(Arch::Llama, &dir, 6)?;
    let config = FreeKvConfig {
        page_size: 16,
        budget: 128,
        sink: 32,
        window: 32,
        ..FreeKvConfig::default()
    };
    // Room for 512 tokens of KV in total.
    let attention = Attention::FreeKv {
        config,
        context_tokens: 512,
    };
    let fkv = load(Source::Plain(&model.dir), &attention, 4).await?;
    let model = std::sync::Arc::new(fkv.model);
    let big = {
        let model = model.clone();
        tokio::spawn(async move { greedy(&model, &filler_text(1, 2000), 16).await })
    };
    let small = {
        let model = model.clone();
        tokio::spawn(async move { greedy(&model, &filler_text(2, 60), 16).await })
    };
    let small = tokio::time::timeout(Duration::from_secs(120), small).await???;
    assert_eq!(small.tokens.len(), 16, "the small request did not complete");
    let big = tokio::time::timeout(Duration::from_secs(120), big).await??;
    let err = big.expect_err("a 2,000-token prompt fit in a 512-token host tier");
    let err = format!("{err:#}");
    println!("the oversized request failed with: {err}");
    assert!(
        err.contains("exceeds KV cache"),
        "the oversized request's error does not say why: {err}"
    );
    // And the model still serves.
    let again = greedy(&model, &filler_text(3, 60), 8).await?;
    assert_eq!(again.tokens.len(), 8);
    Ok(())
}
