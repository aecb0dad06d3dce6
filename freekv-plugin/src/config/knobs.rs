//! How a knob's text (an environment variable, a CLI flag) becomes its value: one parser per
//! value type, so a bad value gets the same message whatever it came from.

use std::fmt;

use super::choices::{DeviceTierLayout, Mode, Pooling, PrefillAttention, Selector, SummaryKind};
use super::{ConfigError, FreeKvConfig};

/// One knob of [`FreeKvConfig`]: its names and help, and how to set it from text. The table
/// of every knob is [`FreeKvConfig::KNOBS`], generated with the struct from one declaration.
#[derive(Clone, Copy)]
pub struct Knob {
    /// The field (and serde) name, e.g. `page_size`.
    pub name: &'static str,
    /// The CLI flag without its dashes, e.g. `freekv-page-size`.
    pub flag: &'static str,
    /// The environment variable, e.g. `FREEKV_PAGE_SIZE`.
    pub env: &'static str,
    /// What the value is, for help texts (`TOKENS`, `MODE`, ...).
    pub value_name: &'static str,
    /// The field's documentation (its first line is the short help).
    pub help: &'static str,
    /// Parses `text` and sets the knob in a configuration.
    pub set: fn(&mut FreeKvConfig, &str) -> Result<(), ConfigError>,
    /// The knob's value in a configuration, as it would be written.
    pub show: fn(&FreeKvConfig) -> String,
}

impl fmt::Debug for Knob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Knob").field("name", &self.name).finish()
    }
}

/// A knob's value type: parsed from text, written back as text.
pub trait KnobValue: Sized {
    /// Parses `text`; the error says what would be valid.
    fn parse(text: &str) -> Result<Self, String>;
    /// The value as it would be written.
    fn show(&self) -> String;
}

impl KnobValue for usize {
    fn parse(text: &str) -> Result<Self, String> {
        text.trim()
            .parse()
            .map_err(|_| "a non-negative integer number of tokens".to_string())
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl KnobValue for f32 {
    fn parse(text: &str) -> Result<Self, String> {
        text.trim()
            .parse()
            .map_err(|_| "a number in [-1, 1] (e.g. 0.9)".to_string())
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

/// A list of layer indices: `"0,1,5"`, `""` for none. Spaces around entries are ignored;
/// duplicates are removed and the list sorted.
impl KnobValue for Vec<usize> {
    fn parse(text: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        if text.trim().is_empty() {
            return Ok(out);
        }
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!(
                    "empty entry in layer list {text:?} (expected comma-separated layer indices, e.g. \"0,1,5\")"
                ));
            }
            let layer = part.parse::<usize>().map_err(|_| {
                format!(
                    "{part:?} is not a layer index (expected comma-separated non-negative integers, e.g. \"0,1,5\")"
                )
            })?;
            out.push(layer);
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
    fn show(&self) -> String {
        let parts: Vec<String> = self.iter().map(usize::to_string).collect();
        parts.join(",")
    }
}

/// The choice enums parse through their `ALL` tables.
macro_rules! choice_values {
    ($($ty:ty),*) => {$(
        impl KnobValue for $ty {
            fn parse(text: &str) -> Result<Self, String> {
                <$ty>::ALL
                    .iter()
                    .find(|(_, name)| *name == text.trim())
                    .map(|(v, _)| *v)
                    .ok_or_else(|| {
                        let names: Vec<_> = <$ty>::ALL.iter().map(|(_, n)| *n).collect();
                        format!("one of {}", names.join(", "))
                    })
            }
            fn show(&self) -> String {
                <$ty>::ALL
                    .iter()
                    .find(|(v, _)| v == self)
                    .map_or_else(String::new, |(_, n)| n.to_string())
            }
        }
    )*};
}

choice_values!(
    Mode,
    SummaryKind,
    Pooling,
    Selector,
    DeviceTierLayout,
    PrefillAttention
);

/// Parses `text` as knob `name`'s value type.
pub(super) fn parse<T: KnobValue>(name: &'static str, text: &str) -> Result<T, ConfigError> {
    T::parse(text).map_err(|valid| ConfigError {
        knob: name,
        value: text.to_string(),
        valid,
    })
}

impl FreeKvConfig {
    /// The knob called `name` (field name), if there is one.
    pub fn knob(name: &str) -> Option<&'static Knob> {
        Self::KNOBS.iter().find(|k| k.name == name)
    }

    /// The defaults with the `FREEKV_*` environment variables applied (see [`Self::from_lookup`]).
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The defaults with each knob's variable (`FREEKV_BUDGET`, ..., see
    /// [`FreeKvConfig::KNOBS`]) taken from `lookup`. A value that does not parse is an error
    /// naming the variable, the value and the valid values; the result is not validated as a
    /// whole (call [`Self::validate`]).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let mut c = Self::default();
        for knob in Self::KNOBS {
            if let Some(text) = lookup(knob.env) {
                (knob.set)(&mut c, &text).map_err(|e| anyhow::anyhow!("{}: {e}", knob.env))?;
            }
        }
        Ok(c)
    }
}
