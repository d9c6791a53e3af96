//! `virt8ra admin-token`: rotate the control plane's admin token.

use clap::Subcommand;
use virt8ra_api::*;

use crate::client::Client;
use crate::output::{emit, Format};

#[derive(Debug, Subcommand)]
pub enum AdminTokenCmd {
    /// Replace the admin token: prints the new one (once); the old one
    /// stops working at once.
    Rotate,
}

pub(crate) async fn admin_token(c: &Client, o: Format, cmd: AdminTokenCmd) -> anyhow::Result<()> {
    match cmd {
        AdminTokenCmd::Rotate => {
            let t: AdminToken = c
                .post("/admin-token/rotate", &serde_json::json!({}))
                .await?;
            // The token alone on stdout (for scripts); where it goes, on stderr.
            eprintln!(
                "the old admin token no longer works; the control plane also wrote the new one to \
                 DATA_DIR/admin.token (mode 0600). Put it in VIRT8RA_TOKEN or in token: of \
                 ~/.config/virt8ra/config.yaml."
            );
            emit(o, &t, |t| println!("{}", t.token))
        }
    }
}
