//! Fault injection for the storage fault tests. Built with the
//! `failpoints` feature, a fail point configured as `return(DIR)` (with
//! `fail::cfg`) fails the named operation of the storage under `DIR`, so
//! that one bookie of several in a process can be made to fail. Without
//! the feature, a check is nothing.

use std::path::Path;

#[cfg(feature = "failpoints")]
pub fn check(name: &str, dir: &Path) -> std::io::Result<()> {
    let hit = fail::eval(name, |arg| {
        arg.is_some_and(|d| !d.is_empty() && dir.starts_with(d))
    });
    if hit == Some(true) {
        return Err(std::io::Error::other(format!("injected fault at {name}")));
    }
    Ok(())
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn check(_name: &str, _dir: &Path) -> std::io::Result<()> {
    Ok(())
}
