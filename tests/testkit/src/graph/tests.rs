//! Self-tests of the emulator (filled below).
