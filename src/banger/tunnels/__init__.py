"""Host side of tunnels through the guest agent: relays, published ports, automatic forwards, reverse tunnels, SSH."""
