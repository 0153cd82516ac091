//! `omoi token create|list|revoke`: API tokens, straight in the database (an operator's tool,
//! like `omoi migrate`). `create` prints the token alone on stdout — it is shown this once.

use anyhow::Context;
use clap::Subcommand;

use crate::config::Settings;
use crate::domain::access::Role;
use crate::service::tokens::{CreateToken, Tokens};

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (once).
    Create {
        /// A name unique among live tokens (`ci`, `dashboard`, `worker-gpu-1`).
        #[arg(long)]
        name: String,
        /// admin, operator, agent or viewer.
        #[arg(long)]
        role: Role,
        /// For an agent token: an agent name it may act as (repeat for several).
        #[arg(long = "agent", value_name = "NAME")]
        agents: Vec<String>,
        /// Lifetime such as 3600s, 12h or 90d (default: no expiry).
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
    },
    /// List tokens (never their values).
    List,
    /// Revoke a token by id or name.
    Revoke {
        /// The token's id or name.
        token: String,
    },
}

/// `90d`, `12h`, `30m`, `3600s` or a number of seconds.
fn parse_duration(s: &str) -> anyhow::Result<u64> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .with_context(|| format!("`{s}` is not a duration"))?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        other => anyhow::bail!("unknown unit `{other}` in `{s}`; use s, m, h or d"),
    };
    n.checked_mul(factor)
        .with_context(|| format!("`{s}` is too long"))
}

pub async fn run(settings: &Settings, command: TokenCommand) -> anyhow::Result<()> {
    let pool = crate::db::connect(&settings.database_url, 2).await?;
    crate::db::migrate(&pool).await?;
    let tokens = Tokens::new(pool);
    match command {
        TokenCommand::Create {
            name,
            role,
            agents,
            expires_in,
        } => {
            let expires_in_seconds = expires_in.as_deref().map(parse_duration).transpose()?;
            let issued = tokens
                .create(CreateToken {
                    name,
                    role,
                    agents,
                    expires_in_seconds,
                })
                .await?;
            eprintln!(
                "created token `{}` (role {}, id {}); it is shown once:",
                issued.record.name, issued.record.role, issued.record.id
            );
            println!("{}", issued.token);
        }
        TokenCommand::List => {
            println!("id\tname\trole\tagents\tcreated\texpires\tlast used\trevoked");
            for t in tokens.list().await? {
                let when = |d: Option<chrono::DateTime<chrono::Utc>>| {
                    d.map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                        .unwrap_or_else(|| "-".into())
                };
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    t.id,
                    t.name,
                    t.role,
                    if t.agents.is_empty() {
                        "-".into()
                    } else {
                        t.agents.join(",")
                    },
                    when(Some(t.created_at)),
                    when(t.expires_at),
                    when(t.last_used_at),
                    when(t.revoked_at),
                );
            }
        }
        TokenCommand::Revoke { token } => {
            let revoked = tokens.revoke(&token).await?;
            eprintln!("revoked token `{}` ({})", revoked.name, revoked.id);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations_read_seconds_minutes_hours_and_days() {
        assert_eq!(parse_duration("90d").unwrap(), 90 * 86_400);
        assert_eq!(parse_duration("12h").unwrap(), 43_200);
        assert_eq!(parse_duration("3600").unwrap(), 3_600);
        assert!(parse_duration("3w").is_err());
        assert!(parse_duration("d").is_err());
    }
}
