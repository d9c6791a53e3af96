//! The format of an image from its own bytes, and the references to other
//! files that its headers declare.
//!
//! qemu is never asked to guess a format (its probe would take a raw disk
//! that starts with a qcow2 header for a qcow2, and a text file for a VMDK
//! descriptor), and the file name means nothing. The headers are read here
//! because the answer must not depend on opening the image with qemu: a
//! VMDK descriptor or a qcow2 data file is refused before qemu-img ever
//! sees the file, with a message that says what was found.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{Format, ImageError, Policy, HOW_TO_FIX};

/// What the headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sniffed {
    pub format: Format,
    /// The virtual size the header declares (raw: the file's size).
    pub virtual_size: u64,
    /// Whether the header names a backing file (only a staged disk may).
    pub backing: bool,
}

/// Bytes read from the start: a qcow2's header extensions live in its
/// first cluster (at most 2 MiB).
const HEAD: u64 = 2 << 20;
/// The largest embedded VMDK descriptor read.
const MAX_DESCRIPTOR: u64 = 1 << 20;

fn refused(what: String) -> ImageError {
    ImageError::Refused(what)
}

/// A refusal for a reference to another file.
fn external(what: &str) -> ImageError {
    refused(format!(
        "the image refers to another file ({what}): {HOW_TO_FIX}"
    ))
}

/// At most 200 printable characters of a name found in a file.
fn shown(b: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(b)
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    format!("{s:?}")
}

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}
fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_be_bytes(a)
    })
}
fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}
fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

/// Reads up to `len` bytes at `at` (fewer at the end of the file).
fn read_at(f: &File, at: u64, len: u64) -> Result<Vec<u8>, ImageError> {
    let mut buf = vec![0u8; len as usize];
    let mut have = 0;
    while have < buf.len() {
        match f.read_at(&mut buf[have..], at + have as u64) {
            Ok(0) => break,
            Ok(n) => have += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ImageError::Internal(format!("read the image: {e}"))),
        }
    }
    buf.truncate(have);
    Ok(buf)
}

/// Formats qemu knows that are not accepted, by their magic at offset 0.
const OTHER_MAGICS: &[(&[u8], &str)] = &[
    (b"QED\0", "QED"),
    (b"LUKS\xba\xbe", "LUKS-encrypted"),
    (b"COWD", "VMware ESX sparse (COWD) VMDK"),
    (b"WithoutFreeSpace", "Parallels"),
    (b"WithouFreSpacExt", "Parallels"),
    (b"Bochs Virtual HD Image", "Bochs"),
    (b"#!/bin/sh\n#V2.0 Format", "cloop"),
];

/// Decides the format of the file at `path` from its bytes and checks what
/// its headers declare against `policy`.
pub fn sniff(path: &Path, policy: &Policy) -> Result<Sniffed, ImageError> {
    let f = File::open(path).map_err(|e| ImageError::Internal(format!("open the image: {e}")))?;
    let len = f
        .metadata()
        .map_err(|e| ImageError::Internal(format!("stat the image: {e}")))?
        .len();
    if len == 0 {
        return Err(refused("the image is empty".into()));
    }
    let head = read_at(&f, 0, HEAD.min(len))?;
    let tail = read_at(&f, len.saturating_sub(512), 512.min(len))?;
    let s = if head.starts_with(b"QFI\xfb") {
        qcow2(&head, policy)?
    } else if head.starts_with(b"KDMV") {
        vmdk_sparse(&f, &head)?
    } else if head.starts_with(b"vhdxfile") {
        vhdx(&f)?
    } else if head.starts_with(b"conectix") || (len >= 1024 && tail.starts_with(b"conectix")) {
        vhd(&f, &head, &tail)?
    } else if let Some(desc) = vmdk_descriptor_text(&head) {
        return Err(descriptor_refusal(desc));
    } else if let Some((_, name)) = OTHER_MAGICS.iter().find(|(m, _)| head.starts_with(m)) {
        return Err(unsupported(name));
    } else if le32(&head, 0x40) == 0xbeda_107f {
        return Err(unsupported("VirtualBox (VDI)"));
    } else if tail.starts_with(b"koly") {
        return Err(unsupported("Apple disk image (DMG)"));
    } else {
        if len % 512 != 0 {
            return Err(refused(format!(
                "not a disk image: {len} bytes of data in no known format (a raw disk is a multiple of 512 bytes)"
            )));
        }
        Sniffed {
            format: Format::Raw,
            virtual_size: len,
            backing: false,
        }
    };
    if !policy.formats.contains(&s.format) {
        return Err(refused(format!(
            "a {} image is not accepted here; expected {}",
            s.format.describe(),
            policy
                .formats
                .iter()
                .map(|f| f.describe())
                .collect::<Vec<_>>()
                .join(" or ")
        )));
    }
    policy.check_size(s.virtual_size)?;
    Ok(s)
}

fn unsupported(name: &str) -> ImageError {
    refused(format!(
        "{name} images are not accepted: import qcow2, raw, VMDK (monolithicSparse or streamOptimized), VHD or VHDX; convert it first with qemu-img convert -O qcow2 IN OUT"
    ))
}

/// qcow2 header extension types.
const QCOW2_EXT_END: u32 = 0;
const QCOW2_EXT_CRYPTO: u32 = 0x0537_be77;
const QCOW2_EXT_DATA_FILE: u32 = 0x4441_5441;
/// qcow2 v3 incompatible feature bit: the data is in an external file.
const QCOW2_INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// qcow2 v3 autoclear feature bit: the external data file is raw.
const QCOW2_AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

fn qcow2(h: &[u8], policy: &Policy) -> Result<Sniffed, ImageError> {
    let version = be32(h, 4);
    if version == 1 {
        return Err(unsupported("qcow (version 1)"));
    }
    if (version != 2 && version != 3) || h.len() < 72 {
        return Err(refused(format!(
            "not a readable disk image: a qcow2 header of unknown version {version} or cut short"
        )));
    }
    let (backing_off, backing_len) = (be64(h, 8), be32(h, 16));
    let backing = backing_off != 0 || backing_len != 0;
    if backing && !policy.allow_backing {
        let name = usize::try_from(backing_off)
            .ok()
            .and_then(|o| h.get(o..o + backing_len.min(4096) as usize))
            .map(shown)
            .unwrap_or_else(|| "a name outside the first cluster".into());
        return Err(external(&format!("qcow2 backing file {name}")));
    }
    if be32(h, 32) != 0 {
        return Err(encrypted());
    }
    let ext_start = if version == 3 {
        if be64(h, 72) & QCOW2_INCOMPAT_DATA_FILE != 0 {
            return Err(external("qcow2 external data file"));
        }
        if be64(h, 88) & QCOW2_AUTOCLEAR_DATA_FILE_RAW != 0 {
            return Err(external("qcow2 external raw data file"));
        }
        be32(h, 100) as usize
    } else {
        72
    };
    // Header extensions: type, length, data padded to 8 bytes.
    let mut at = ext_start;
    for _ in 0..1024 {
        if at + 8 > h.len() {
            break;
        }
        let (t, n) = (be32(h, at), be32(h, at + 4) as usize);
        match t {
            QCOW2_EXT_END => break,
            QCOW2_EXT_DATA_FILE => {
                let name = h.get(at + 8..at + 8 + n.min(4096)).map(shown);
                return Err(external(&format!(
                    "qcow2 external data file {}",
                    name.unwrap_or_default()
                )));
            }
            QCOW2_EXT_CRYPTO => return Err(encrypted()),
            _ => {}
        }
        at += 8 + n.div_ceil(8) * 8;
    }
    Ok(Sniffed {
        format: Format::Qcow2,
        virtual_size: be64(h, 24),
        backing,
    })
}

fn encrypted() -> ImageError {
    refused(
        "the image is encrypted: upload an unencrypted image (qemu-img convert -O qcow2 with the key, then upload OUT)"
            .into(),
    )
}

/// A sparse VMDK (`KDMV`): self-contained unless its capacity is 0, which
/// makes qemu read the extents from the embedded descriptor instead.
fn vmdk_sparse(f: &File, h: &[u8]) -> Result<Sniffed, ImageError> {
    let capacity = le64(h, 12);
    let (desc_off, desc_len) = (le64(h, 28), le64(h, 36));
    let desc = if desc_off != 0 && desc_len != 0 {
        let at = desc_off.saturating_mul(512);
        let n = desc_len.saturating_mul(512).min(MAX_DESCRIPTOR);
        let b = read_at(f, at, n)?;
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        Some(String::from_utf8_lossy(&b[..end]).into_owned())
    } else {
        None
    };
    let d = desc.as_deref().map(parse_descriptor).unwrap_or_default();
    if capacity == 0 {
        let what = d.extents.first().map_or_else(
            || "a sparse VMDK of capacity 0, whose extents a descriptor names".to_string(),
            |e| format!("VMDK extent {} {}", e.kind, shown(e.file.as_bytes())),
        );
        return Err(external(&what));
    }
    if let Some(p) = &d.parent {
        return Err(external(&format!("VMDK parent {}", shown(p.as_bytes()))));
    }
    if let Some(t) = &d.create_type {
        if t != "monolithicSparse" && t != "streamOptimized" {
            return Err(external(&format!("VMDK of createType {t:?}")));
        }
    }
    if let Some(e) = d
        .extents
        .iter()
        .find(|e| e.kind != "SPARSE" || e.file.contains('/') || e.file.contains(':'))
    {
        return Err(external(&format!(
            "VMDK extent {} {}",
            e.kind,
            shown(e.file.as_bytes())
        )));
    }
    if d.extents.len() > 1 {
        return Err(external(&format!("VMDK with {} extents", d.extents.len())));
    }
    Ok(Sniffed {
        format: Format::Vmdk,
        virtual_size: capacity.saturating_mul(512),
        backing: false,
    })
}

#[derive(Debug, Default)]
struct Descriptor {
    create_type: Option<String>,
    parent: Option<String>,
    extents: Vec<Extent>,
}

#[derive(Debug)]
struct Extent {
    kind: String,
    file: String,
}

/// The parts of a VMDK descriptor that name other files.
fn parse_descriptor(text: &str) -> Descriptor {
    let mut d = Descriptor::default();
    for line in text.lines().map(str::trim) {
        let unquote = |v: &str| v.trim().trim_matches('"').to_string();
        if let Some(v) = line.strip_prefix("createType=") {
            d.create_type = Some(unquote(v));
        } else if let Some(v) = line.strip_prefix("parentFileNameHint=") {
            d.parent = Some(unquote(v));
        } else if ["RW ", "RDONLY ", "NOACCESS "]
            .iter()
            .any(|p| line.starts_with(p))
        {
            // ACCESS SECTORS TYPE "FILE" [OFFSET]
            let mut words = line.splitn(4, ' ');
            let kind = words.nth(2).unwrap_or("").to_string();
            let rest = words.next().unwrap_or("");
            let file = rest.split('"').nth(1).unwrap_or(rest).to_string();
            d.extents.push(Extent { kind, file });
        }
    }
    d
}

/// The descriptor text if `head` is a VMDK text descriptor: what qemu's
/// probe takes for one (comment and blank lines, then `version=N`), or a
/// file that says it is one.
fn vmdk_descriptor_text(head: &[u8]) -> Option<String> {
    let start = &head[..head.len().min(64 << 10)];
    let text = String::from_utf8_lossy(start);
    let says = text.trim_start().starts_with("# Disk DescriptorFile");
    let probe = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .find(|l| !l.starts_with('#') && !l.trim().is_empty())
        .is_some_and(|l| l.starts_with("version="));
    (says || probe).then(|| text.into_owned())
}

fn descriptor_refusal(text: String) -> ImageError {
    let d = parse_descriptor(&text);
    match d.extents.first() {
        Some(e) => external(&format!(
            "VMDK extent {} {}",
            e.kind,
            shown(e.file.as_bytes())
        )),
        None => external("a VMDK descriptor, which names its data files"),
    }
}

/// VHD disk types (big-endian, at 60 in the footer).
const VHD_FIXED: u32 = 2;
const VHD_DYNAMIC: u32 = 3;
const VHD_DIFFERENCING: u32 = 4;

/// A VHD: its footer is at the end (fixed and dynamic disks) and copied at
/// the start (dynamic); a differencing disk names its parent.
fn vhd(f: &File, head: &[u8], tail: &[u8]) -> Result<Sniffed, ImageError> {
    let footer = if head.starts_with(b"conectix") {
        head
    } else {
        tail
    };
    let disk_type = be32(footer, 60);
    match disk_type {
        VHD_FIXED => {}
        VHD_DYNAMIC => {
            // The dynamic header's 8 parent locator entries (24 bytes each
            // at 576) are empty on a disk without a parent.
            let dyn_header = read_at(f, be64(footer, 16), 1024)?;
            if !dyn_header.starts_with(b"cxsparse") {
                return Err(refused(
                    "a damaged VHD: the dynamic disk header is missing".into(),
                ));
            }
            let locators = (0..8).any(|i| be32(&dyn_header, 576 + i * 24) != 0);
            if locators
                || dyn_header
                    .get(40..56)
                    .is_some_and(|u| u.iter().any(|&b| b != 0))
            {
                return Err(external("VHD parent locator"));
            }
        }
        VHD_DIFFERENCING => return Err(external("differencing VHD with a parent locator")),
        t => return Err(refused(format!("a VHD of unknown disk type {t}"))),
    }
    Ok(Sniffed {
        format: Format::Vpc,
        virtual_size: be64(footer, 48),
        backing: false,
    })
}

/// GUIDs as stored on disk (the first three fields little-endian).
const VHDX_METADATA_REGION: [u8; 16] = [
    0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e,
];
const VHDX_FILE_PARAMETERS: [u8; 16] = [
    0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b,
];
const VHDX_PARENT_LOCATOR: [u8; 16] = [
    0x2d, 0x5f, 0xd3, 0xa8, 0x0b, 0xb3, 0x4d, 0x45, 0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c,
];
const VHDX_VIRTUAL_DISK_SIZE: [u8; 16] = [
    0x24, 0x42, 0xa5, 0x2f, 0x1b, 0xcd, 0x76, 0x48, 0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8,
];
/// File Parameters flag: the disk is a differencing disk.
const VHDX_HAS_PARENT: u32 = 1 << 1;

/// A VHDX: the region table (at 192 KiB) locates the metadata region,
/// whose table says whether the disk has a parent.
fn vhdx(f: &File) -> Result<Sniffed, ImageError> {
    let damaged = || refused("a damaged VHDX: its region table or metadata cannot be read".into());
    let regions = read_at(f, 192 << 10, 64 << 10)?;
    if !regions.starts_with(b"regi") {
        return Err(damaged());
    }
    let count = le32(&regions, 8).min(2047) as usize;
    let meta_off = (0..count)
        .map(|i| 16 + i * 32)
        .find(|&e| regions.get(e..e + 16) == Some(&VHDX_METADATA_REGION[..]))
        .map(|e| le64(&regions, e + 16))
        .ok_or_else(damaged)?;
    let table = read_at(f, meta_off, 64 << 10)?;
    if !table.starts_with(b"metadata") {
        return Err(damaged());
    }
    let entries = le16(&table, 10).min(2047) as usize;
    let mut virtual_size = None;
    for e in (0..entries).map(|i| 32 + i * 32) {
        let Some(id) = table.get(e..e + 16) else {
            break;
        };
        let item = meta_off + u64::from(le32(&table, e + 16));
        if id == VHDX_PARENT_LOCATOR {
            return Err(external("differencing VHDX with a parent locator"));
        }
        if id == VHDX_FILE_PARAMETERS && le32(&read_at(f, item, 8)?, 4) & VHDX_HAS_PARENT != 0 {
            return Err(external("differencing VHDX (it has a parent)"));
        }
        if id == VHDX_VIRTUAL_DISK_SIZE {
            virtual_size = Some(le64(&read_at(f, item, 8)?, 0));
        }
    }
    Ok(Sniffed {
        format: Format::Vhdx,
        virtual_size: virtual_size.ok_or_else(damaged)?,
        backing: false,
    })
}
