//! `omoi nats-auth`: writes the nats-server authorization of a namespace (`auth.conf`, public
//! keys and permissions only) and one NKEY seed file per user (`<user>.nk`, mode 0600) into a
//! directory. Seeds already there are kept, so adding a worker rotates nobody else's key
//! (`--rotate` makes new ones for all).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;

use crate::bus::Names;
use crate::bus::permissions::{Role, User, render};
use crate::config::Settings;

#[derive(Debug, Args)]
pub struct NatsAuthArgs {
    /// Directory to write `auth.conf` and the `<user>.nk` seed files into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A worker user and the agents it hosts: `NAME:agent1,agent2`, or `NAME` for a user acting
    /// as the one agent of that name. Repeat for each worker.
    #[arg(long = "worker", value_name = "NAME[:AGENTS]")]
    pub workers: Vec<String>,
    /// Extra submitter users (one named `submitter` is always written).
    #[arg(long = "submitter", value_name = "NAME")]
    pub submitters: Vec<String>,
    /// Extra read-only observer users (one named `observer` is always written).
    #[arg(long = "observer", value_name = "NAME")]
    pub observers: Vec<String>,
    /// Make new keys for every user, replacing the seed files there.
    #[arg(long)]
    pub rotate: bool,
}

fn valid_user(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !ok {
        bail!("user name `{name}`: 1 to 64 of A-Z a-z 0-9 . _ -");
    }
    Ok(())
}

/// The seed of `user` in `dir`: the one there (unless rotating), else a new one, written 0600.
fn seed_for(dir: &Path, user: &str, rotate: bool) -> anyhow::Result<nkeys::KeyPair> {
    let path = dir.join(format!("{user}.nk"));
    if path.exists() && !rotate {
        return crate::bus::read_seed(&path.to_string_lossy()).map_err(anyhow::Error::from);
    }
    let pair = nkeys::KeyPair::new_user();
    let seed = pair.seed().map_err(|e| anyhow::anyhow!("seed: {e}"))?;
    write_secret(&path, &format!("{seed}\n"))?;
    Ok(pair)
}

#[cfg(unix)]
fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(not(unix))]
fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

pub fn run(settings: &Settings, args: NatsAuthArgs) -> anyhow::Result<()> {
    let names = Names::new(&settings.namespace).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let mut wanted: Vec<(String, Role)> = vec![
        ("control-plane".into(), Role::ControlPlane),
        ("submitter".into(), Role::Submitter),
        ("observer".into(), Role::Observer),
    ];
    for w in &args.workers {
        let (user, agents) = match w.split_once(':') {
            Some((user, agents)) => (
                user.to_string(),
                agents
                    .split(',')
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .map(str::to_string)
                    .collect::<Vec<_>>(),
            ),
            None => (w.clone(), vec![w.clone()]),
        };
        if agents.is_empty() {
            bail!("--worker {w}: name at least one agent");
        }
        for a in &agents {
            crate::service::registry::validate_name(a)
                .map_err(|e| anyhow::anyhow!("--worker {w}: {e}"))?;
        }
        wanted.push((user, Role::Worker { agents }));
    }
    wanted.extend(args.submitters.iter().map(|s| (s.clone(), Role::Submitter)));
    wanted.extend(args.observers.iter().map(|s| (s.clone(), Role::Observer)));
    let mut users = Vec::new();
    for (name, role) in wanted {
        valid_user(&name)?;
        if users.iter().any(|u: &User| u.name == name) {
            bail!("user `{name}` is named twice");
        }
        let pair = seed_for(&args.out, &name, args.rotate)?;
        users.push(User {
            name,
            role,
            public_key: pair.public_key(),
        });
    }
    let conf = args.out.join("auth.conf");
    std::fs::write(&conf, render(&names, &users))
        .with_context(|| format!("write {}", conf.display()))?;
    eprintln!(
        "wrote {} for namespace `{}`: include it in nats-server.conf. Give each process its seed:",
        conf.display(),
        names.namespace()
    );
    for u in &users {
        println!(
            "{}\t{}\tOMOI_NATS_NKEY_FILE={}",
            u.name,
            u.role.describe(),
            args.out.join(format!("{}.nk", u.name)).display()
        );
    }
    Ok(())
}
