"""How peers are found (mDNS, bootstrap list, Kademlia DHT); see issue 'Swarm membership'."""
