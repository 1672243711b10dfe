//! The in-process cluster of the test kit, for broker tests.
#![allow(unused_imports)]

pub use magnetar_testkit::inproc::Cluster;
