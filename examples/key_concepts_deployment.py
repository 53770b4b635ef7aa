"""Ray Serve's key-concepts example: a deployment that returns a message set in its constructor.

Run it as a plain script: ``python examples/key_concepts_deployment.py``.
The only change from the Ray Serve version is the import.
"""

import trioserve as serve
from trioserve.handle import DeploymentHandle


@serve.deployment
class MyFirstDeployment:
    # Take the message to return as an argument to the constructor.
    def __init__(self, msg):
        self._msg = msg

    def __call__(self):
        return self._msg


my_first_deployment = MyFirstDeployment.bind("Hello world!")
handle: DeploymentHandle = serve.run(my_first_deployment)
assert handle.remote().result() == "Hello world!"
print(handle.remote().result())
