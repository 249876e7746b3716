//! The simulation the fuzz targets drive; `tests/properties.rs` includes the
//! same file, so both check the same promises.
#![forbid(unsafe_code)]

pub mod sim;
