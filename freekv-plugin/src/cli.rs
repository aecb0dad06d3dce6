//! `--freekv-*` command-line flags for the engine's CLI (`--features freekv`): one flag per
//! knob of [`FreeKvConfig::KNOBS`], with that knob's help, default and environment variable.
//!
//! A flag wins over its `FREEKV_*` variable, which wins over the default. Flag values are
//! parsed by the same parsers as the variables (one message per bad value), then validated
//! (and the backend registered) before any model loads, so a bad knob stops the command with
//! a message that names it.

use clap::{Arg, ArgMatches, Args, Command, FromArgMatches};

use crate::config::Knob;
use crate::FreeKvConfig;

/// The help section the flags are listed under.
const HEADING: &str = "FreeKV KV-cache retrieval";

/// The `--freekv-*` flags as given (knob name and text, in knob order).
#[derive(Clone, Debug, Default)]
pub struct FreeKvArgs {
    given: Vec<(&'static str, String)>,
}

/// The knob's documentation on one line.
fn doc(knob: &Knob) -> String {
    let mut out = String::new();
    for line in knob.help.lines().map(str::trim) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(line);
    }
    out
}

fn arg(knob: &'static Knob) -> Arg {
    let default = (knob.show)(&FreeKvConfig::default());
    let default = if default.is_empty() {
        "\"\"".to_string()
    } else {
        default
    };
    Arg::new(knob.flag)
        .long(knob.flag)
        .global(true)
        .value_name(knob.value_name)
        .help_heading(HEADING)
        .help(format!(
            "{} [env: {}] [default: {default}]",
            doc(knob),
            knob.env
        ))
}

impl Args for FreeKvArgs {
    fn augment_args(cmd: Command) -> Command {
        FreeKvConfig::KNOBS
            .iter()
            .fold(cmd, |cmd, knob| cmd.arg(arg(knob)))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for FreeKvArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let given = FreeKvConfig::KNOBS
            .iter()
            .filter_map(|k| {
                let text = matches.get_one::<String>(k.flag)?;
                Some((k.name, text.clone()))
            })
            .collect();
        Ok(Self { given })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl FreeKvArgs {
    /// The configuration: `FREEKV_*` variables over the defaults, flags over both, validated.
    /// An invalid value is an error naming the flag, the value and what is valid.
    pub fn config(&self) -> anyhow::Result<FreeKvConfig> {
        let mut c = FreeKvConfig::from_env()?;
        for (name, text) in &self.given {
            let knob = FreeKvConfig::knob(name)
                .ok_or_else(|| anyhow::anyhow!("FreeKV has no knob {name:?}"))?;
            (knob.set)(&mut c, text).map_err(|e| anyhow::anyhow!("--{}: {e}", knob.flag))?;
        }
        c.validate(None)?;
        Ok(c)
    }
}

/// Validates the knobs and registers FreeKV with the engine (the CLI's start-up hook).
pub fn install(args: &FreeKvArgs) -> anyhow::Result<()> {
    crate::engine::register(args.config()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Flags as if given on the command line, by knob name.
    fn flags(pairs: &[(&'static str, &str)]) -> FreeKvArgs {
        FreeKvArgs {
            given: pairs.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        }
    }

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        freekv: FreeKvArgs,
        #[arg(long)]
        other: Option<String>,
    }

    #[test]
    fn every_knob_is_a_flag_with_its_env_and_default_in_the_help() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let help = cmd.render_help().to_string();
        for knob in FreeKvConfig::KNOBS {
            assert!(help.contains(&format!("--{}", knob.flag)), "{help}");
            assert!(help.contains(knob.env), "{help}");
        }
        assert!(
            help.contains(HEADING) && help.contains("[default: 2048]"),
            "{help}"
        );
    }

    #[test]
    fn flags_parse_with_the_knobs_parsers() {
        let cli = Cli::try_parse_from([
            "x",
            "--freekv-budget",
            "1536",
            "--freekv-mode",
            "sync",
            "--freekv-dense-layers",
            "",
            "--other",
            "y",
        ])
        .unwrap();
        let c = cli.freekv.config().unwrap();
        assert_eq!(c.budget, 1536);
        assert_eq!(c.mode, crate::Mode::Sync);
        assert!(c.dense_layers.is_empty());
        assert_eq!(cli.other.as_deref(), Some("y"));
        let e = flags(&[("mode", "fast")]).config().unwrap_err().to_string();
        assert_eq!(
            e,
            "--freekv-mode: invalid FreeKV mode = fast: one of dense, sync, speculative, freekv"
        );
        let e = flags(&[("tau", "3")]).config().unwrap_err().to_string();
        assert!(e.contains("tau = 3") && e.contains("[-1, 1]"), "{e}");
    }
}
