"""The node's HTTP face: a twisted.web resource tree, thin around the node's objects."""
