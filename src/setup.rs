//! `tidemark setup`: check the source and create what archiving needs, with a report.
//!
//! Creates the publication (FOR ALL TABLES) and the logical slot if they are missing, and
//! reports every table whose updates and deletes cannot be replicated, with the statement that
//! fixes it, and what the database uses that the archive will not carry. Installs DDL capture
//! (see [`crate::ddl`]) and the publication's protection against DROP and ALTER when the role
//! may; without it, archiving still runs but a change to a table's columns stops the archiver.
//! Everything is checked (a free slot among them) before anything is created.

use crate::conninfo::ConnInfo;
use crate::replication::ReplicationClient;
use crate::source::Source;

pub async fn run(info: &ConnInfo, slot: &str, publication: &str) -> anyhow::Result<()> {
    let source = Source::connect(info).await?;
    source.check_server().await?;
    println!(
        "source {info}: wal_level=logical, role {:?} may replicate",
        source.user
    );
    // Every check before the first change: a missing free slot is found before the
    // publication and the event triggers are created.
    let existing_slot = source.slot(slot).await?;
    if existing_slot.is_none() {
        source.check_free_slot().await?;
    }
    if source.publication_exists(publication).await? {
        println!("publication {publication:?} exists");
    } else {
        source.create_publication(publication).await?;
        println!("created publication {publication:?} FOR ALL TABLES");
    }
    match crate::ddl::ensure_capture(&source.client).await {
        Ok(c) => println!("{}", c.describe()),
        Err(e) => println!("DDL capture is NOT installed: {}", crate::error::chain(&e)),
    }
    crate::ddl::ensure_protected(&source.client, publication).await;
    match existing_slot {
        Some(s) => println!(
            "slot {slot:?} exists (confirmed flush {})",
            s.confirmed_flush
        ),
        None => {
            let mut repl = ReplicationClient::connect(info).await?;
            let created = repl.create_logical_slot(slot, false, false).await?;
            println!("created slot {slot:?} at {}", created.consistent_point);
        }
    }
    let bad = source.unreplicable_tables().await?;
    if bad.is_empty() {
        println!("every table can replicate updates and deletes");
    } else {
        println!("{} table(s) have no primary key and no usable replica identity: their UPDATEs and DELETEs cannot be archived. Fix with:", bad.len());
        for (_, fix) in &bad {
            println!("  {fix}");
        }
    }
    let missing = source.not_covered(publication).await?;
    if missing.is_empty() {
        println!("the archive will carry everything this database holds");
    }
    for m in &missing {
        println!("not archived: {m}");
    }
    Ok(())
}
