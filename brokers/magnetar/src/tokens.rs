//! `magnetar tokens`: keys and tokens for token authentication, with
//! Pulsar's `pulsar tokens` verbs so that its scripts carry over.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use clap::{Args, Subcommand};
use magnetar_tenancy::auth::{create_secret_key, create_token, read_key};

#[derive(Args)]
pub struct TokensArgs {
    #[command(subcommand)]
    command: TokensCommand,
}

#[derive(Subcommand)]
enum TokensCommand {
    /// A new random HS256 secret key.
    CreateSecretKey {
        /// Write the key here (raw bytes) instead of printing it.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Base64 instead of raw bytes.
        #[arg(long, short)]
        base64: bool,
    },
    /// A token for a role, printed on stdout.
    Create {
        /// The HMAC secret key: `file:///path`, a path, or `data:;base64,…`.
        #[arg(
            long,
            conflicts_with = "private_key",
            required_unless_present = "private_key"
        )]
        secret_key: Option<String>,
        /// A PEM private key (RSA, EC or Ed25519), given likewise.
        #[arg(long)]
        private_key: Option<String>,
        /// The role the token proves.
        #[arg(long)]
        subject: String,
        /// Lifetime such as 30s, 10m, 12h, 7d or 1y; none by default.
        #[arg(long, value_parser = parse_expiry)]
        expiry_time: Option<Duration>,
    },
}

fn parse_expiry(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("no number in '{s}'"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "y" => 365 * 86_400,
        _ => return Err(format!("unknown unit '{unit}' (s, m, h, d, w, y)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

pub fn run(args: TokensArgs) -> anyhow::Result<()> {
    match args.command {
        TokensCommand::CreateSecretKey { output, base64 } => {
            let key = create_secret_key();
            let bytes = if base64 {
                base64::engine::general_purpose::STANDARD
                    .encode(&key)
                    .into_bytes()
            } else {
                key
            };
            match output {
                Some(path) => std::fs::write(&path, &bytes)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => {
                    use std::io::Write;
                    std::io::stdout().write_all(&bytes)?;
                }
            }
        }
        TokensCommand::Create {
            secret_key,
            private_key,
            subject,
            expiry_time,
        } => {
            let token = match (secret_key, private_key) {
                (Some(spec), _) => create_token(&read_key(&spec)?, false, &subject, expiry_time)?,
                (None, Some(spec)) => create_token(&read_key(&spec)?, true, &subject, expiry_time)?,
                (None, None) => anyhow::bail!("--secret-key or --private-key is required"),
            };
            println!("{token}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiries_parse() {
        assert_eq!(parse_expiry("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_expiry("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_expiry("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_expiry("h").is_err());
        assert!(parse_expiry("3q").is_err());
    }
}
