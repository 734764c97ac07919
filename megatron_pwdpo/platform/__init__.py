"""The processes and the machine: platform decisions (CPU / GPU without TE / GPU with TE),
process groups, the CPU bridge, launching, signals and lifetimes, megatron-core version
compatibility. Imports nothing else of the package."""
