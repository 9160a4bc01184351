//! CAR v1 files: a header naming root CIDs, then length-prefixed blocks.
//!
//! Reading checks every block against its CID (a CAR is untrusted input),
//! refuses duplicate roots of nothing and bounds what it holds: blocks are
//! at most 4 MiB each (the reader's own limit) and a file at most
//! [`MAX_BLOCKS`] blocks.

use std::collections::HashMap;

use iroh_car::{CarHeader, CarReader};

use crate::model::{cid_of, Cid, DAG_CBOR, RAW};

/// Most blocks one CAR file may hold.
pub const MAX_BLOCKS: usize = 4_000_000;

/// A CAR file that cannot be read, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CarError {
    #[error("not a CAR v1 file: {0}")]
    Malformed(String),
    #[error("block {0} does not hash to its CID (the file is corrupt or forged)")]
    BadCid(Cid),
    #[error(
        "block {cid} uses codec 0x{codec:x}; only DAG-CBOR (0x71) and raw (0x55) are accepted"
    )]
    Codec { cid: Cid, codec: u64 },
    #[error("the CAR holds more than {MAX_BLOCKS} blocks")]
    TooManyBlocks,
}

/// The blocks of a CAR file and its roots.
#[derive(Debug, Clone, Default)]
pub struct Car {
    pub roots: Vec<Cid>,
    pub blocks: HashMap<Cid, Vec<u8>>,
    /// Block CIDs in file order.
    pub order: Vec<Cid>,
}

/// Reads a whole CAR file, checking every block's hash.
pub async fn read(bytes: &[u8]) -> Result<Car, CarError> {
    let mut reader = CarReader::new(bytes)
        .await
        .map_err(|e| CarError::Malformed(e.to_string()))?;
    if reader.header().version() != 1 {
        return Err(CarError::Malformed(format!(
            "version {} (only CAR v1 is read)",
            reader.header().version()
        )));
    }
    let mut car = Car {
        roots: reader.header().roots().to_vec(),
        ..Car::default()
    };
    while let Some((cid, data)) = reader
        .next_block()
        .await
        .map_err(|e| CarError::Malformed(e.to_string()))?
    {
        check_block(&cid, &data)?;
        if car.blocks.len() >= MAX_BLOCKS {
            return Err(CarError::TooManyBlocks);
        }
        if car.blocks.insert(cid, data).is_none() {
            car.order.push(cid);
        }
    }
    Ok(car)
}

/// [`read`] without an async runtime (reading from memory never waits).
pub fn read_sync(bytes: &[u8]) -> Result<Car, CarError> {
    futures::executor::block_on(read(bytes))
}

/// Checks that `data` is what `cid` names.
pub fn check_block(cid: &Cid, data: &[u8]) -> Result<(), CarError> {
    let codec = cid.codec();
    if codec != DAG_CBOR && codec != RAW {
        return Err(CarError::Codec { cid: *cid, codec });
    }
    if cid.hash().code() != 0x12 || cid_of(codec, data) != *cid {
        return Err(CarError::BadCid(*cid));
    }
    Ok(())
}

/// Writes a CAR v1 file with one root and `blocks` in the order given.
///
/// Written by hand (a varint-prefixed DAG-CBOR header, then varint-prefixed
/// CID + bytes per block) so that commits and exports need no async
/// runtime; the reader above checks what it writes in the tests.
pub fn write<'a>(root: Cid, blocks: impl IntoIterator<Item = (Cid, &'a [u8])>) -> Vec<u8> {
    let header = CarHeader::new_v1(vec![root])
        .encode()
        .expect("a CAR header always encodes");
    let mut out = Vec::with_capacity(header.len() + 64);
    varint(&mut out, header.len() as u64);
    out.extend_from_slice(&header);
    for (cid, data) in blocks {
        let cid = cid.to_bytes();
        varint(&mut out, (cid.len() + data.len()) as u64);
        out.extend_from_slice(&cid);
        out.extend_from_slice(data);
    }
    out
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}
