//! `--freekv-*` command-line flags for the engine's CLI (`--features freekv`): one flag per
//! knob of [`FreeKvConfig::KNOBS`], with that knob's help, default and environment variable.
//!
//! A flag wins over its `FREEKV_*` variable, which wins over the default. Flag values are
//! parsed by the same parsers as the variables (one message per bad value), then validated
//! (and the backend registered) before any model loads, so a bad knob stops the command with
//! a message that names it.

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};

use crate::config::Knob;
use crate::FreeKvConfig;

/// The help section the flags are listed under.
const HEADING: &str = "FreeKV KV-cache retrieval";

/// The flag that leaves FreeKV out: the engine runs its own attention.
const OFF_FLAG: &str = "no-freekv";

/// The `--freekv-*` flags as given (knob name and text, in knob order), and `--no-freekv`.
#[derive(Clone, Debug, Default)]
pub struct FreeKvArgs {
    given: Vec<(&'static str, String)>,
    off: bool,
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
        let off = Arg::new(OFF_FLAG)
            .long(OFF_FLAG)
            .global(true)
            .action(ArgAction::SetTrue)
            .help_heading(HEADING)
            .help(
                "Leave FreeKV out: the engine runs its own attention and KV cache, as a build \
                 without FreeKV does (for side-by-side comparisons; no --freekv-* flag may be given)",
            );
        FreeKvConfig::KNOBS
            .iter()
            .fold(cmd.arg(off), |cmd, knob| cmd.arg(arg(knob)))
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
        let off = matches.get_flag(OFF_FLAG);
        Ok(Self { given, off })
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

impl FreeKvArgs {
    /// Whether FreeKV is to be registered: not with `--no-freekv`, which may not be combined
    /// with a `--freekv-*` flag (an error naming it).
    pub fn enabled(&self) -> anyhow::Result<bool> {
        match (self.off, self.given.first()) {
            (true, Some((name, _))) => {
                let flag = FreeKvConfig::knob(name).map_or(*name, |k| k.flag);
                anyhow::bail!("--{OFF_FLAG} leaves FreeKV out, so --{flag} would have no effect")
            }
            (off, _) => Ok(!off),
        }
    }
}

/// Validates the knobs and registers FreeKV with the engine (the CLI's start-up hook); with
/// `--no-freekv`, registers nothing and the engine runs as it does without FreeKV.
pub fn install(args: &FreeKvArgs) -> anyhow::Result<()> {
    if !args.enabled()? {
        return Ok(());
    }
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
            off: false,
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

    #[test]
    fn no_freekv_leaves_it_out_and_refuses_its_knobs() {
        let on = Cli::try_parse_from(["x", "--other", "y"]).unwrap();
        assert!(on.freekv.enabled().unwrap());
        let off = Cli::try_parse_from(["x", "--no-freekv"]).unwrap();
        assert!(!off.freekv.enabled().unwrap());
        let both = Cli::try_parse_from(["x", "--no-freekv", "--freekv-budget", "512"]).unwrap();
        let e = both.freekv.enabled().unwrap_err().to_string();
        assert_eq!(
            e,
            "--no-freekv leaves FreeKV out, so --freekv-budget would have no effect"
        );
        assert!(install(&both.freekv).is_err());
    }
}
