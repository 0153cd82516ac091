//! `omoi simulate`: runs a pattern end to end on the real bus with simulated agents and reports
//! how it went.

pub mod latency;
pub mod report;
