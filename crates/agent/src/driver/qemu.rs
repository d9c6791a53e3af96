//! QEMU driver (to be written).
