//! The plan of one layer's decode step for the whole batch, built once before any device work
//! (as FlashInfer's and vLLM's metadata builders plan a step): per row, which sequence it is,
//! where its token goes and how its step goes. The timeline checks it when it is built, then
//! runs each stage over every row from it; `Display` prints it (snapshot tests, debugging).

use std::fmt;

use crate::state::RowStep;

/// One row of a step, as planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedRow {
    /// The sequence.
    pub seq_id: u64,
    /// Its context, the step's token included (the token goes to position `len - 1`).
    pub len: usize,
    /// How the step goes.
    pub step: RowStep,
    /// The context does not continue the sequence's state (the engine trimmed or re-fed it):
    /// rebuilt from the host tier.
    pub rebuild: bool,
    /// The row runs the correction test (mode `freekv`, a speculated selection).
    pub tests_drift: bool,
}

/// The plan of one decode step of one layer: row `r` of the batch is `rows[r]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// One entry per batch row.
    pub rows: Vec<PlannedRow>,
}

impl StepPlan {
    /// The rows that run the correction test, in row order.
    pub fn tested(&self) -> impl Iterator<Item = usize> + '_ {
        self.rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.tests_drift)
            .map(|(i, _)| i)
    }

    /// The batch row of sequence `seq_id`, if the step has it.
    pub fn row_of(&self, seq_id: u64) -> Option<usize> {
        self.rows.iter().position(|r| r.seq_id == seq_id)
    }

    /// Checks what every later stage relies on: each sequence appears once, every context
    /// holds its token, and only a speculated row runs the correction test.
    pub fn check(&self) -> anyhow::Result<()> {
        for (i, r) in self.rows.iter().enumerate() {
            anyhow::ensure!(r.len > 0, "row {i}: sequence {} with no tokens", r.seq_id);
            anyhow::ensure!(
                !self.rows[..i].iter().any(|o| o.seq_id == r.seq_id),
                "sequence {} appears twice in one decode step",
                r.seq_id
            );
            anyhow::ensure!(
                !r.tests_drift || r.step == RowStep::Speculated,
                "row {i}: a correction test for a {:?} step",
                r.step
            );
        }
        Ok(())
    }
}

impl fmt::Display for StepPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "row  seq   len  step        rebuild  drift-test")?;
        for (i, r) in self.rows.iter().enumerate() {
            writeln!(
                f,
                "{i:>3}  {:>3}  {:>4}  {:<10}  {:<7}  {}",
                r.seq_id,
                r.len,
                format!("{:?}", r.step),
                if r.rebuild { "yes" } else { "-" },
                if r.tests_drift { "yes" } else { "-" },
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq_id: u64, step: RowStep, tests_drift: bool) -> PlannedRow {
        PlannedRow {
            seq_id,
            len: 100 + seq_id as usize,
            step,
            rebuild: step == RowStep::Fresh,
            tests_drift,
        }
    }

    #[test]
    fn a_plan_prints_one_line_per_row() {
        let plan = StepPlan {
            rows: vec![
                row(3, RowStep::Dense, false),
                row(7, RowStep::Fresh, false),
                row(9, RowStep::Speculated, true),
                row(11, RowStep::Whole, false),
            ],
        };
        plan.check().unwrap();
        assert_eq!(plan.tested().collect::<Vec<_>>(), vec![2]);
        assert_eq!(plan.row_of(9), Some(2));
        insta::assert_snapshot!(plan.to_string());
    }

    #[test]
    fn a_plan_that_breaks_what_the_stages_rely_on_is_refused() {
        let twice = StepPlan {
            rows: vec![row(3, RowStep::Dense, false), row(3, RowStep::Dense, false)],
        };
        assert!(format!("{}", twice.check().unwrap_err()).contains("twice"));
        let dense_test = StepPlan {
            rows: vec![row(4, RowStep::Dense, true)],
        };
        assert!(dense_test.check().is_err());
        let empty = StepPlan {
            rows: vec![PlannedRow {
                len: 0,
                ..row(5, RowStep::Dense, false)
            }],
        };
        assert!(empty.check().is_err());
    }
}
