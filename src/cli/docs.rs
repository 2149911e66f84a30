//! `authd completions SHELL` and `authd man`: shell completions and the manual page, made
//! from the command line's definition ([`super::Cli`], clap derive) at run time, so they
//! name exactly the subcommands and flags this binary has.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, CommandFactory};
use clap_complete::Shell;
use clap_mangen::Man;

use super::{Cli, Failure};

#[derive(Args)]
#[command(after_help = "Install, e.g.:
  bash: authd completions bash > /usr/share/bash-completion/completions/authd
  zsh:  authd completions zsh > /usr/local/share/zsh/site-functions/_authd
  fish: authd completions fish > ~/.config/fish/completions/authd.fish")]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: Shell,
}

#[derive(Args)]
#[command(after_help = "Read it with `authd man | man -l -`, or install it: \
`authd man > /usr/local/share/man/man1/authd.1`.")]
pub struct ManArgs {
    /// Write one page per command (authd.1, authd-serve.1, authd-ctl-entity-put.1, …) into
    /// this directory instead of printing one page that has them all.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Prints the completion script for `args.shell`.
pub(super) fn completions(args: CompletionsArgs) -> Result<(), Failure> {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "authd", &mut script);
    print(&script)
}

/// Prints the manual page (or writes one per command into `--dir`).
pub(super) fn man(args: ManArgs) -> Result<(), Failure> {
    let mut cli = Cli::command().disable_help_subcommand(true);
    cli.build();
    if let Some(dir) = args.dir {
        return clap_mangen::generate_to(cli, &dir)
            .map_err(|e| Failure::Unable(format!("{}: {e}", dir.display())));
    }
    let mut page = Vec::new();
    whole_page(&cli, &mut page).map_err(Failure::unable)?;
    print(&page)
}

/// authd(1): the top-level page, then a section per subcommand (depth first) with its
/// synopsis, description and options, so that one page documents every flag.
fn whole_page(cli: &clap::Command, out: &mut Vec<u8>) -> std::io::Result<()> {
    Man::new(cli.clone()).render(out)?;
    for sub in visible_subcommands(cli) {
        command_section(sub, out)?;
    }
    Ok(())
}

fn command_section(cmd: &clap::Command, out: &mut Vec<u8>) -> std::io::Result<()> {
    let name = cmd.get_bin_name().unwrap_or_else(|| cmd.get_name());
    writeln!(out, ".SH \"{}\"", name.to_uppercase())?;
    let man = Man::new(cmd.clone());
    let mut part = Vec::new();
    man.render_synopsis_section(&mut part)?;
    man.render_description_section(&mut part)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut part)?;
    }
    if cmd.get_after_help().is_some() {
        man.render_extra_section(&mut part)?;
    }
    // The command's own sections are subsections of its section here.
    for line in String::from_utf8_lossy(&part).lines() {
        match line.strip_prefix(".SH ") {
            Some(heading) => writeln!(out, ".SS {heading}")?,
            None => writeln!(out, "{line}")?,
        }
    }
    for sub in visible_subcommands(cmd) {
        command_section(sub, out)?;
    }
    Ok(())
}

fn visible_subcommands(cmd: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    cmd.get_subcommands()
        .filter(|c| !c.is_hide_set() && c.get_name() != "help")
}

/// Writes `bytes` to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn print(bytes: &[u8]) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::Unable(format!("writing to stdout: {e}"))),
    }
}
