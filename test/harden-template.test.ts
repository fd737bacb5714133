// Issue 8, finding 3: a chat template from a model folder must not kill or hang qlora. Each hostile template below
// aborted Node, hung it or overflowed the stack before the renderer was bounded; now each is a one-line QloraError
// naming the template's file and name, within seconds. Real templates render exactly as the library renders them.
import {test, describe, before, after} from "node:test";
import assert from "node:assert/strict";
import {execFileSync, spawnSync} from "node:child_process";
import {promises as fs} from "node:fs";
import os from "node:os";
import path from "node:path";
import {Template} from "@huggingface/jinja";
import {formatRecord} from "../src/data/formats.js";
import {QloraError} from "../src/errors.js";
import {HfTokenizer} from "../src/tokenizer/index.js";
import {DEFAULT_TEMPLATE_LIMITS, parseTemplate, renderTemplate, TemplateLimitError} from "../src/tokenizer/bounded-template.js";
import {MODEL_DIR, REPO_ROOT, SHARED} from "./helpers/paths.js";

const TINY_QWEN = path.join(SHARED, "models", "tiny-qwen2");

// a string of 2^21 characters, made by doubling (the size limit of a render with small input is 4 Mi characters)
const BIG_STRING = "{% set big = namespace(s='x') %}{% for i in range(21) %}{% set big.s = big.s ~ big.s %}{% endfor %}";

/** the hostile templates, by name; each is refused with a message matching `expect` */
const HOSTILE: Record<string, {template: string; expect: RegExp}> = {
    // finding 3 itself: 2.2 GB in 4.5 s, then Node aborted
    "huge-range": {
        template: "{% for i in range(1000000000) %}x{% endfor %}",
        expect: /ran past its range\(\) limit: range\(0, 1000000000, 1\) would make 1,000,000,000 numbers, more than the 100,000/
    },
    "nested-loops": {
        template: "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
        expect: /ran past its (time limit of 2\.0 s|size limit: the values it built add up)/
    },
    doubling: {
        template: "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        expect: /ran past its size limit: it built a value of 8,388,608 characters, more than the 4,19\d,\d{3} allowed/
    },
    "recursive-macro": {
        template: "{% macro f(g, n) %}{{ g(g, n + 1) }}{% endmacro %}{{ f(f, 0) }}",
        expect: /ran past its depth limit: it nests evaluations more than 200 deep/
    },
    "nested-parentheses": {
        template: "{{ " + "(".repeat(100_000) + "1" + ")".repeat(100_000) + " }}",
        expect: /cannot be parsed: it nests brackets or blocks deeper than the parser can follow/
    },
    "nested-ifs": {
        template: "{% if true %}".repeat(20_000) + "{% endif %}".repeat(20_000),
        expect: /cannot be parsed: it nests brackets or blocks deeper than the parser can follow/
    },
    // a list holding the previous one twice: 2^60 leaves in 60 steps; printing it would never end
    "shared-list": {
        template: "{% set ns = namespace(a=[1]) %}{% for i in range(60) %}{% set ns.a = [ns.a, ns.a] %}{% endfor %}{{ ns.a }}",
        expect: /ran past its size limit: it built a value of [\d,]+ characters/
    },
    // one call, a few characters in, 800 MB out
    "indent-width": {
        template: "{{ 'a\\nb' | indent(400000000) }}",
        expect: /with indent\(…\) a text of up to 800,000,003 characters/
    },
    "tojson-indent": {
        template: "{{ [1, 2, 3] | tojson(indent=300000000) }}",
        expect: /with tojson\(…\) a text of up to [\d,]+ characters/
    },
    // 2^21 matches, each replaced by 2^21 characters
    replace: {
        template: BIG_STRING + "{{ big.s.replace('x', big.s) }}",
        expect: /with replace\(…\) a text of 4,398,046,511,104 characters/
    },
    "replace-filter": {
        template: BIG_STRING + "{{ big.s | replace('x', big.s) }}",
        expect: /with replace\(…\) a text of 4,398,046,511,104 characters/
    },
    "replace-as-variable": {
        template: BIG_STRING + "{% set r = big.s['rep' ~ 'lace'] %}{{ r('x', big.s) }}",
        expect: /with replace\(…\) a text of/
    },
    join: {
        template: BIG_STRING + "{{ big.s | join(big.s) }}",
        expect: /with join\(…\) a text of up to 4,398,048,608,256 characters/
    },
    // each upper() is a fresh copy; kept in a list they would fill memory long before the time limit
    "fresh-copies": {
        template:
            BIG_STRING +
            "{% set keep = namespace(a=[]) %}{% for i in range(100000) %}{% set keep.a = keep.a + [big.s.upper()] %}{% endfor %}",
        expect: /ran past its size limit/
    },
    // a namespace grows after a list of 64 references to it was built: the list is measured again before printing
    "namespace-grows": {
        template:
            "{% set box = namespace(s='') %}{% set ns = namespace(a=[box]) %}{% for i in range(6) %}{% set ns.a = ns.a + ns.a %}{% endfor %}" +
            "{% set big = namespace(s='x') %}{% for i in range(17) %}{% set big.s = big.s ~ big.s %}{% endfor %}{% set box.s = big.s %}{{ ns.a }}",
        expect: /ran past its size limit: it built a value of 8,389,\d{3} characters/
    },
    "namespace-in-itself": {
        template: "{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}",
        expect: /a namespace contains itself/
    },
    "too-long": {
        template: "{# " + "x".repeat(1024 * 1024) + " #}",
        expect: /it is 1,048,582 characters long, more than the 1,048,576 a template may have/
    }
};

let tempDir: string;
let configPath: string;
let hostile: HfTokenizer;

/** a tokenizer folder with tiny-qwen2's tokenizer.json and the given files */
async function tokenizerFolder(name: string, files: Record<string, string>): Promise<string> {
    const dir = path.join(tempDir, name);
    await fs.mkdir(dir);
    await fs.symlink(path.join(TINY_QWEN, "tokenizer.json"), path.join(dir, "tokenizer.json"));
    for (const [file, text] of Object.entries(files)) await fs.writeFile(path.join(dir, file), text);
    return dir;
}

before(async () => {
    tempDir = await fs.mkdtemp(path.join(os.tmpdir(), "qlora-harden-template-"));
    // all hostile templates in one tokenizer_config.json, as a list of named templates
    const config = JSON.parse(await fs.readFile(path.join(TINY_QWEN, "tokenizer_config.json"), "utf8"));
    config.chat_template = Object.entries(HOSTILE).map(([name, {template}]) => ({name, template}));
    const dir = await tokenizerFolder("hostile", {"tokenizer_config.json": JSON.stringify(config)});
    configPath = path.join(dir, "tokenizer_config.json");
    hostile = await HfTokenizer.load(dir);
});
after(async () => {
    await fs.rm(tempDir, {recursive: true, force: true});
});

/** runs `fn`, expecting a QloraError; returns it with the seconds it took */
function expectQloraError(fn: () => unknown): {err: QloraError; seconds: number} {
    const start = performance.now();
    try {
        fn();
    } catch (err) {
        const seconds = (performance.now() - start) / 1000;
        assert.ok(err instanceof QloraError, `expected a QloraError, got ${(err as Error)?.stack ?? String(err)}`);
        assert.ok(!err.message.includes("\n"), `one line: ${err.message}`);
        return {err, seconds};
    }
    assert.fail("expected a QloraError, nothing was thrown");
}

describe("hostile chat templates are refused, naming the file and the template", () => {
    for (const [name, {expect}] of Object.entries(HOSTILE)) {
        test(name, {timeout: 60_000}, () => {
            const {err, seconds} = expectQloraError(() =>
                hostile.applyChatTemplate([{role: "user", content: "hi"}], {templateName: name})
            );
            assert.ok(err.message.startsWith(`${configPath}: the chat template "${name}" `), err.message);
            assert.match(err.message, expect);
            assert.match(err.message, /the template is broken or hostile: fix or replace it/);
            // the time limit is 2 s; the rest is slack for a loaded machine
            assert.ok(seconds < 10, `took ${seconds.toFixed(1)} s`);
        });
    }

    test("chat_template.jinja is named when the template comes from it", async () => {
        const dir = await tokenizerFolder("jinja-file", {"chat_template.jinja": HOSTILE["huge-range"].template});
        const tokenizer = await HfTokenizer.load(dir);
        const {err} = expectQloraError(() => tokenizer.applyChatTemplate([{role: "user", content: "hi"}]));
        assert.match(
            err.message,
            new RegExp(
                `^${path.join(dir, "chat_template.jinja").replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}: the chat template "default" ran past its range\\(\\) limit`
            )
        );
    });

    test("an empty loop inside a loop is stopped by the clock too", {timeout: 60_000}, () => {
        // no expression runs inside the inner loop: only its iterations can be counted
        const template = parseTemplate("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}");
        const start = performance.now();
        assert.throws(
            () => renderTemplate(template, {}, {...DEFAULT_TEMPLATE_LIMITS, timeMs: 200}),
            (err: unknown) => err instanceof TemplateLimitError && /time limit of 0\.2 s/.test(err.message)
        );
        assert.ok(performance.now() - start < 5000);
    });
});

describe("templates that fail keep failing with their own message", () => {
    test("raise_exception: the message, on one line", async () => {
        const dir = await tokenizerFolder("raise", {
            "chat_template.jinja": "{{ raise_exception('Only user and\\nassistant roles are supported!') }}"
        });
        const tokenizer = await HfTokenizer.load(dir);
        const {err} = expectQloraError(() => tokenizer.applyChatTemplate([{role: "user", content: "hi"}]));
        assert.match(
            err.message,
            /chat_template\.jinja: the chat template failed on these messages: Only user and assistant roles are supported!/
        );
    });

    test("an undefined variable used as a list", async () => {
        const dir = await tokenizerFolder("undefined-list", {
            "chat_template.jinja": "{% for m in conversation %}{{ m }}{% endfor %}"
        });
        const tokenizer = await HfTokenizer.load(dir);
        const {err} = expectQloraError(() => tokenizer.applyChatTemplate([{role: "user", content: "hi"}]));
        assert.match(
            err.message,
            /chat_template\.jinja: the chat template failed on these messages: Expected iterable or object type in for loop: got UndefinedValue/
        );
    });

    test("a very long template error message is cut", async () => {
        const dir = await tokenizerFolder("long-raise", {
            "chat_template.jinja": "{{ raise_exception('" + "y".repeat(10_000) + "') }}"
        });
        const tokenizer = await HfTokenizer.load(dir);
        const {err} = expectQloraError(() => tokenizer.applyChatTemplate([{role: "user", content: "hi"}]));
        assert.ok(err.message.length < 600, `${err.message.length} characters`);
        assert.match(err.message, /y…/);
    });
});

// Real templates, written as the model repositories ship them (Qwen2.5 with tools, Llama 3.1 with tools, Gemma)
const QWEN25_TOOLS = `{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
`;

const LLAMA31_TOOLS = `{{- bos_token }}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- set first_user_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + "}<|eot_id|>" }}
    {%- else %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
`;

const GEMMA =
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}";

const TOOLS = [
    {
        type: "function",
        function: {
            name: "get_weather",
            description: "Get the weather for a city",
            parameters: {
                type: "object",
                properties: {
                    city: {type: "string", description: "City name"},
                    unit: {type: "string", enum: ["celsius", "fahrenheit"]}
                },
                required: ["city"]
            }
        }
    },
    {
        type: "function",
        function: {
            name: "search",
            description: "Search the web",
            parameters: {type: "object", properties: {query: {type: "string"}}, required: ["query"]}
        }
    }
];
const TOOL_CHAT = [
    {role: "system", content: "You are a helpful assistant."},
    {role: "user", content: "What's the weather in Paris? 床前明月光 😀"},
    {
        role: "assistant",
        content: "",
        tool_calls: [{type: "function", function: {name: "get_weather", arguments: {city: "Paris"}}}]
    },
    {role: "tool", content: '{"temp": 21}'},
    {role: "assistant", content: "It is 21 °C in Paris."},
    {role: "user", content: "Thanks!\nAnd tomorrow?"}
];

describe("real templates render as before", () => {
    test("tiny-qwen2's template: byte for byte what it rendered before the limits", async () => {
        const tokenizer = await HfTokenizer.load(TINY_QWEN);
        const conversation = [
            {role: "system", content: "Be terse."},
            {role: "user", content: "2+2?"},
            {role: "assistant", content: "4"},
            {role: "user", content: "床前明月光 😀\n\tx"}
        ];
        // recorded with the unbounded Template.render
        assert.equal(
            tokenizer.applyChatTemplate([{role: "user", content: "hi"}], {addGenerationPrompt: true}),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert.equal(
            tokenizer.applyChatTemplate(conversation),
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n" +
                "<|im_start|>user\n床前明月光 😀\n\tx<|im_end|>\n"
        );
        assert.equal(tokenizer.applyChatTemplate([], {addGenerationPrompt: true}), "<|im_start|>assistant\n");
        assert.equal(tokenizer.applyChatTemplate([]), "");
    });

    const cases: [string, string, Record<string, unknown>][] = [
        ["Qwen2.5 with tools", QWEN25_TOOLS, {messages: TOOL_CHAT, tools: TOOLS, add_generation_prompt: true}],
        ["Qwen2.5 without tools", QWEN25_TOOLS, {messages: TOOL_CHAT.slice(4), add_generation_prompt: false}],
        [
            "Llama 3.1 with tools",
            LLAMA31_TOOLS,
            {
                messages: TOOL_CHAT,
                tools: TOOLS,
                add_generation_prompt: true,
                bos_token: "<|begin_of_text|>",
                date_string: "26 Jul 2024"
            }
        ],
        [
            "Gemma",
            GEMMA,
            {
                messages: [
                    {role: "user", content: " hi "},
                    {role: "assistant", content: "hello"},
                    {role: "user", content: "how are you?"}
                ],
                add_generation_prompt: true,
                bos_token: "<bos>"
            }
        ]
    ];
    for (const [name, text, variables] of cases) {
        test(`${name}: the same text as the library's own render`, () => {
            const expected = new Template(text).render(variables);
            assert.ok(expected.length > 100);
            assert.equal(renderTemplate(parseTemplate(text), variables), expected);
        });
    }

    test("strftime_now gives what the library's gives", () => {
        const text = "{{ strftime_now('%Y-%m-%d %b %B %H:%M %% %y') }}";
        const before = new Template(text).render({});
        const ours = renderTemplate(parseTemplate(text), {});
        const after = new Template(text).render({});
        assert.ok(ours === before || ours === after, `${ours} vs ${before}`); // a minute may turn in between
    });

    test("range() still counts like Python's", () => {
        const text =
            "{{ range(5)|join(',') }}|{{ range(2, 11, 3)|join(',') }}|{{ range(5, 0, -2)|join(',') }}|{{ range(0)|length }}|{{ range(100000)|length }}";
        assert.equal(renderTemplate(parseTemplate(text), {}), "0,1,2,3,4|2,5,8|5,3,1|0|100000");
        assert.equal(renderTemplate(parseTemplate(text), {}), new Template(text).render({}));
    });

    test("a long conversation is not refused for being long", () => {
        // 2,000 turns, 5 MB of text: more than the 4 Mi characters a render of a short conversation may make
        const messages = Array.from({length: 2000}, (_, i) => ({
            role: i % 2 ? "assistant" : "user",
            content: `turn ${i} `.repeat(250)
        }));
        const variables = {messages, add_generation_prompt: true};
        const out = renderTemplate(parseTemplate(QWEN25_TOOLS), variables);
        assert.ok(out.length > DEFAULT_TEMPLATE_LIMITS.valueChars, `${out.length}`);
        assert.equal(out, new Template(QWEN25_TOOLS).render(variables));
    });
});

describe("tokenizer files are read without blocking", {skip: process.platform === "win32" && "no FIFOs"}, () => {
    for (const file of ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]) {
        test(`a FIFO named ${file} fails at once`, {timeout: 20_000}, async () => {
            const dir = path.join(tempDir, `fifo-${file}`);
            await fs.mkdir(dir);
            if (file !== "tokenizer.json")
                await fs.symlink(path.join(TINY_QWEN, "tokenizer.json"), path.join(dir, "tokenizer.json"));
            execFileSync("mkfifo", [path.join(dir, file)]);
            await assert.rejects(HfTokenizer.load(dir), (err: unknown) => {
                assert.ok(err instanceof QloraError);
                assert.match(err.message, new RegExp(`${file.replace(".", "\\.")}: expected a regular file, found a FIFO`));
                return true;
            });
        });
    }
});

// a Jinja template in the train config's `template` key is rendered by the same bounded renderer, once per record
describe("hostile Jinja templates in the template key are refused, naming the key", () => {
    const expected: Record<string, RegExp> = {
        "huge-range": HOSTILE["huge-range"].expect,
        doubling: /ran past its size limit: it built a value of [\d,]+ characters, more than the [\d,]+ allowed/,
        "recursive-macro": HOSTILE["recursive-macro"].expect,
        "nested-ifs": /cannot be parsed: it nests deeper than the parser can follow/
    };
    for (const [name, expect] of Object.entries(expected)) {
        test(name, {timeout: 60_000}, () => {
            const template = `{{ instruction }}${HOSTILE[name].template}`;
            const {err, seconds} = expectQloraError(() =>
                formatRecord({instruction: "hi", output: "ok"}, "template", {template})
            );
            assert.ok(err.message.startsWith("template: the Jinja template "), err.message);
            assert.match(err.message, expect);
            assert.ok(seconds < 10, `took ${seconds.toFixed(1)} s`);
        });
    }
});

test("CLI: generate --chat with a hostile template exits 1 with one line, in seconds", {timeout: 60_000}, async () => {
    const dir = path.join(tempDir, "cli-model");
    await fs.mkdir(dir);
    for (const f of ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"])
        await fs.symlink(path.join(MODEL_DIR, f), path.join(dir, f));
    await fs.writeFile(path.join(dir, "chat_template.jinja"), HOSTILE["huge-range"].template);
    const start = performance.now();
    const r = spawnSync(
        process.execPath,
        [
            "--import",
            "tsx",
            path.join(REPO_ROOT, "src", "cli", "main.ts"),
            "generate",
            "--chat",
            "--model",
            dir,
            "--prompt",
            "hi",
            "-n",
            "2"
        ],
        {encoding: "utf8", cwd: REPO_ROOT, timeout: 50_000}
    );
    const seconds = (performance.now() - start) / 1000;
    assert.equal(r.status, 1, `exit code (stderr: ${r.stderr})`);
    const lines = r.stderr.trim().split("\n");
    assert.equal(lines.length, 1, r.stderr);
    assert.ok(
        lines[0].startsWith(
            `error: ${path.join(dir, "chat_template.jinja")}: the chat template "default" ran past its range() limit`
        ),
        lines[0]
    );
    assert.equal(r.stdout, "");
    assert.ok(seconds < 30, `took ${seconds.toFixed(1)} s`); // mostly starting node and tsx; the template fails at once
});
