"""The local Cassandra (devstack) runs with the storage settings its template names."""

from __future__ import annotations

from cassandra.cluster import Session


def test_the_local_cassandra_uses_trie_memtables_off_the_heap_and_bti_sstables(cassandra: Session) -> None:
    """devstack/cassandra/cassandra.yaml.template sets 5.0's storage engine for new clusters (docs/performance.md,
    issue 20's ninth steps: a tenth less of Cassandra's CPU per event); the server's own view of its settings
    says whether it took them."""
    settings = {row.name: row.value for row in cassandra.execute("SELECT name, value FROM system_views.settings")}
    memtables = settings.get("memtable.configurations") or ""
    assert "default=trie" in memtables, memtables
    assert "trie=TrieMemtable" in memtables, memtables
    assert settings["memtable_allocation_type"] == "offheap_objects"
    assert settings["sstable.selected_format"] == "bti"
    assert settings["storage_compatibility_mode"] == "NONE"
