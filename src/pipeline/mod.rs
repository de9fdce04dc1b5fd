//! The poll and delivery pipeline: what a worker does with `poll` and `deliver` tasks.

pub mod cursor;
