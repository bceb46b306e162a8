"""The cluster: transport, envelopes, membership (SWIM + Lifeguard), dissemination, trust."""
